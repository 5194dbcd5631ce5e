"""The method contract: what every FCIL method implements, and the registry that finds it.

A method is a server/client pair (as FL-bench keeps them) plus a pydantic model of its own
hyperparameters, which is also its config section. The server side follows Flower's
Strategy naming (hooks named after what they do); the client side is one pure function
`local_train(payload, data, ctx)`, so it can run in-process or inside a Ray actor and give
the same numbers: everything it may depend on travels in its three arguments.

Payloads and updates are `Message`s: a flat dict of numpy arrays plus small JSON-able
metadata. They cross process boundaries cheaply (Ray's object store reads numpy arrays
zero-copy) and their size is what the runner reports as bytes down/up.
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from bench.config import MethodConfig
from bench.errors import UserError
from bench.inputs import Input
from bench.seeds import derive_seed

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

ENTRY_POINT_GROUP = "fedame_bench.methods"

__all__ = [
    "Aggregator",
    "Client",
    "ClientData",
    "ClientUpdate",
    "Combined",
    "Message",
    "MethodConfig",
    "MethodEnv",
    "RunFlag",
    "Server",
    "ServerHandle",
    "TaskInfo",
    "TrainContext",
    "TrainSettings",
    "available_methods",
    "derive_seed",
    "get_method",
    "register",
]


@dataclass
class Message:
    """What crosses the wire: named numpy arrays plus small metadata (JSON-able)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


@dataclass
class ClientUpdate(Message):
    """A client's answer: its trained arrays, how many samples trained them, its loss."""

    num_samples: int = 0
    loss: float = float("nan")
    client_id: int = -1  # set by the executor: who sent it (aggregation shares, attacks)
    #: what the client keeps on its device until it next trains (a personal model, a local
    #: memory): never sent, never aggregated, not counted on the wire; the executor takes it
    #: out of the update and hands it back as `TrainContext.kept` the next time
    kept: dict[str, np.ndarray] | None = None


@dataclass
class ClientData:
    """One client's training data for the current task.

    `x` holds backbone features (float32, N x D) for feature methods, or images
    (uint8, N x H x W x 3) for methods whose `input` is "images"; `y` holds global labels
    (numpy). When clients train on a GPU, `x` is a torch tensor already on `ctx.device`
    (the worker keeps it there for the whole task); `bench.training.as_tensor` takes either.
    """

    client_id: int
    x: np.ndarray | torch.Tensor
    y: np.ndarray


@dataclass(frozen=True)
class TrainSettings:
    """The local-training knobs shared by all methods (from the `training` config section)."""

    local_epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class TrainContext:
    """Everything about *this* call of local_train besides payload and data."""

    run_seed: int
    task: int
    round: int
    client_id: int
    train: TrainSettings
    device: str = "cpu"
    kept: dict[str, np.ndarray] | None = None  # what this client kept last time it trained (ClientUpdate.kept)

    @property
    def seed(self) -> int:
        """A seed derived from (run seed, task, round, client): same on every executor."""
        return derive_seed(self.run_seed, "client", self.task, self.round, self.client_id)


@dataclass(frozen=True)
class TaskInfo:
    """What the server learns at the start of a task."""

    index: int
    classes: tuple[int, ...]  # the new classes of this task (global label ids)
    seen_classes: tuple[int, ...]  # all classes up to and including this task
    client_classes: dict[int, tuple[int, ...]]  # classes present in each client's data


@dataclass
class Combined:
    """One parameter group combined by an aggregation rule."""

    arrays: dict[str, np.ndarray]
    shares: np.ndarray  # per update, its share of the result (sums to 1)
    fallback: bool = False  # the rule could not apply and the median stood in


class Aggregator(Protocol):
    """The run's aggregation rule, injected by the runner (bench.federation.RuleAggregator), so
    the contract does not depend on the rules."""

    def __call__(
        self,
        updates: list[ClientUpdate],
        keys: list[str],
        weights: list[float] | None,
        reference: dict[str, np.ndarray] | None,
    ) -> Combined: ...


@dataclass(frozen=True)
class RunFlag:
    """A `fedame-bench run --NAME` flag a method brings: it stands for these config overrides."""

    name: str
    help: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class MethodEnv:
    """Static facts a method is built with; identical on server and clients."""

    feature_dim: int
    num_classes: int
    class_names: tuple[str, ...]
    dataset: str
    run_seed: int
    num_clients: int
    train: TrainSettings
    superclasses: tuple[int, ...] | None = None  # per fine class, when the dataset has them
    cache_dir: str = ""
    image_size: int = 32
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    aggregator: Aggregator | None = None  # the run's rule; the runner always sets it


class Client(ABC):
    """Client side of a method. Built once per worker from (config, env); stateless after."""

    def __init__(self, config: MethodConfig, env: MethodEnv) -> None:
        self.config = config
        self.env = env

    #: an optional capability: clients that share a payload can train together in one stacked
    #: computation (`local_train_batch`), used under `runtime.batch_clients`
    batched: ClassVar[bool] = False

    @abstractmethod
    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        """Train on one client's data starting from `payload`; pure in its arguments."""

    def local_train_batch(self, payload: Message, data: list[ClientData], ctxs: list[TrainContext]) -> list[ClientUpdate]:
        """`local_train` of several clients that received the same payload, in one computation;
        called only when `batched` is True (same minibatch order and seeds as one by one)."""
        raise NotImplementedError(f"{type(self).__name__} sets batched = True but has no local_train_batch")


class Server(ABC):
    """Server side of a method: holds the global state and the hooks the runner calls."""

    #: registry name: what --methods and the config's `methods.<name>` section call it
    name: ClassVar[str]
    #: one line for `fedame-bench methods`
    summary: ClassVar[str]
    #: hyperparameter model; also the method's config section
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: (another method, keys): this method's section starts from those keys of that method's
    #: section (a variant shares its parent's inputs, such as anchors, not its switches)
    shares_config: ClassVar[tuple[str, tuple[str, ...]] | None] = None
    #: the client half
    ClientClass: ClassVar[type[Client]]
    #: what the client trains on: backbone features, images, or the dataset's own rows
    #: (interactions: a recommendation dataset's (user, item) rows)
    input: ClassVar[Literal["features", "images", "interactions"]] = "features"
    #: the kinds of experiment (bench/tracks/) this method can run
    tracks: ClassVar[tuple[str, ...]] = ("class_incremental",)
    #: tables this method writes beside the harness's (name -> columns; every row also gets run_id)
    extra_tables: ClassVar[dict[str, pa.Schema]] = {}
    #: columns this method adds to the summary table (null in other methods' rows)
    summary_columns: ClassVar[tuple[tuple[str, pa.DataType], ...]] = ()
    #: prefixes of environment variables its workers read (forwarded to every Ray actor)
    worker_env: ClassVar[tuple[str, ...]] = ()
    #: flags this method adds to `fedame-bench run`
    run_flags: ClassVar[tuple[RunFlag, ...]] = ()

    def __init__(self, config: MethodConfig, env: MethodEnv) -> None:
        self.config = config
        self.env = env
        self._shares: dict[int, list[float]] = {}
        self._fallbacks = 0

    def combine(
        self,
        updates: list[ClientUpdate],
        keys: list[str],
        weights: list[float] | None = None,
        reference: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """One parameter group (a model, a head, one expert) combined by the run's
        aggregation rule (config `aggregation`; the sample-weighted mean by default).
        `weights` default to sample counts; `reference` is the global model the updates
        started from (the attention rule embeds their change from it). Records each
        client's share of the result for the rounds table."""
        if self.env.aggregator is None:
            raise RuntimeError(
                "MethodEnv.aggregator is not set: build the env with bench.runner.method_env (or pass a bench.federation.RuleAggregator)"
            )
        out = self.env.aggregator(updates, keys, weights, reference)
        for u, share in zip(updates, out.shares):
            self._shares.setdefault(u.client_id, []).append(float(share))
        self._fallbacks += out.fallback
        return out.arrays

    def aggregation_report(self) -> dict[str, Any]:
        """Since the last call: each client's share, averaged over the groups combined, and
        how often a rule could not apply (then the median stood in)."""
        report = {"shares": {k: float(np.mean(v)) for k, v in sorted(self._shares.items())}, "fallbacks": self._fallbacks}
        self._shares, self._fallbacks = {}, 0
        return report

    @classmethod
    def input_for(cls, config: MethodConfig) -> Literal["features", "images", "interactions"]:
        """What this method trains on under `config` (`input`, unless a hyperparameter picks
        it, as a model choice between a head on features and a network on images does)."""
        return cls.input

    @classmethod
    def preflight(cls, config: MethodConfig, dataset: Any, cache_dir: Any) -> None:
        """Check, before any run starts, what this method needs beyond the data (anchor
        files, model weights, API settings); raise a UserError saying what to do."""

    @classmethod
    def inputs(cls, config: MethodConfig) -> list[Input]:
        """Files this method reads that `fedame-bench prepare` checks and, where it can, makes
        (bench/inputs.py); a run stops before any work when one is missing."""
        return []

    @classmethod
    def identity(cls, config: MethodConfig) -> dict[str, Any]:
        """Facts outside the config that change this method's numbers (e.g. whether an LLM
        key is set); they enter the run id, so a run under other facts is a new run."""
        return {}

    def setup(self) -> None:
        """Build the initial global state (called once before the first task)."""

    @abstractmethod
    def begin_task(self, task: TaskInfo) -> None:
        """Prepare for a task's new classes (grow heads, assign experts, snapshot teachers)."""

    @abstractmethod
    def payload_for(self, client_id: int) -> Message:
        """What client `client_id` downloads this round (only what it needs)."""

    def payloads_for(self, client_ids: list[int]) -> list[Message]:
        """The round's payloads for the clients sampled, in one call (a server living in
        another process answers the whole round in one message); `payload_for` of each."""
        return [self.payload_for(k) for k in client_ids]

    @abstractmethod
    def aggregate(self, updates: list[ClientUpdate]) -> None:
        """Fold the round's client updates into the global state."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted global labels (restricted to seen classes) for a batch of inputs."""

    def score(self, requests: dict[str, np.ndarray], kept: list[dict[str, np.ndarray] | None]) -> np.ndarray:
        """Scores for a batch of ranking requests (tracks that rank, bench/tracks/sequential_rec.py,
        say what a request holds); `kept` is each request's client's kept state, as its own
        device would use it. Classification methods do not rank."""
        raise NotImplementedError(f"{self.name} does not rank (it runs the {', '.join(self.tracks)} track)")

    def rounds_for_task(self, configured: int, full_participation: bool) -> int:
        """Rounds this method needs per task: `training.rounds` unless it knows better (a
        method that only reports exact statistics needs one round when every client takes part)."""
        return configured

    def end_task(self) -> None:
        """Called after the last round of a task (e.g. to snapshot a teacher)."""

    def stats(self) -> dict[str, float]:
        """Extra per-round numbers for the rounds table (e.g. experts alive)."""
        return {}

    def extra_rows(self) -> dict[str, list[dict[str, Any]]]:
        """This run's rows of the tables in `extra_tables` (read once, after the last task)."""
        return {}

    @classmethod
    def summarize(cls, extra: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Values of `summary_columns` for one run, from its `extra_rows()`."""
        return {}

    @classmethod
    def run_line(cls, summary: dict[str, Any]) -> str | None:
        """A line the CLI prints when a run of this method completes (None: nothing to say)."""
        return None

    @classmethod
    def figures(cls, rounds: pd.DataFrame, extra: dict[str, pd.DataFrame]) -> dict[str, Figure]:
        """Figures of this method's own quantities for `fedame-bench plot` (name -> figure):
        `rounds` is the rounds table of its runs (with alpha and seed), `extra` its extra tables."""
        return {}

    def state(self) -> bytes:
        """The global state after a task, for task-level resume (bench/checkpoint.py): by
        default every attribute, pickled. An attribute that must not be written to disk (a
        network client, an API key) is dropped by its own class's `__getstate__`."""
        return pickle.dumps(self.__dict__, protocol=pickle.HIGHEST_PROTOCOL)

    def load_state(self, blob: bytes) -> None:
        """Restore what `state()` returned (called after `setup()` on a fresh server)."""
        self.__dict__.update(pickle.loads(blob))


@runtime_checkable
class ServerHandle(Protocol):
    """What the runner and the tracks hold of a method's server: the server itself
    in-process, a handle on the central actor under Ray (bench.runtime.ray_actors'
    RemoteServer). Every hook they call is listed here, so a handle cannot answer one with a
    default of its own."""

    def setup(self) -> None: ...
    def load_state(self, blob: bytes) -> None: ...
    def state(self) -> bytes: ...
    def begin_task(self, task: TaskInfo) -> None: ...
    def rounds_for_task(self, configured: int, full_participation: bool) -> int: ...
    def payloads_for(self, client_ids: list[int]) -> Sequence[Any]: ...
    def aggregate(self, updates: list[Any]) -> None: ...
    def predict(self, x: np.ndarray) -> np.ndarray: ...
    def score(self, requests: dict[str, np.ndarray], kept: list[dict[str, np.ndarray] | None]) -> np.ndarray: ...
    def end_task(self) -> None: ...
    def stats(self) -> dict[str, float]: ...
    def aggregation_report(self) -> dict[str, Any]: ...
    def extra_rows(self) -> dict[str, list[dict[str, Any]]]: ...


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Server]] = {}


def register(cls: type[Server]) -> type[Server]:
    """Class decorator: make a method known to the runner under `cls.name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            ep.load()


def available_methods() -> dict[str, type[Server]]:
    """All registered methods, loading those declared under the `fedame_bench.methods` entry point."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


class UnknownMethodError(UserError, ValueError):
    pass


def get_method(name: str) -> type[Server]:
    methods = available_methods()
    if name not in methods:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(methods)} (see `fedame-bench methods`)")
    return methods[name]
