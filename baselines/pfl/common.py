"""The frame every personalised method fills in (the `personalized` track, bench/tracks/personalized.py).

A client keeps its personal model on its device (`ClientUpdate.kept`, under "local.") and,
for methods with a second model, that model too. A method says three things, each one hook
shared by the client and the server's evaluation, so both use the same code:

* `received(global, kept)`: the personal model right after the client takes the server's
  model (FedAvg: the global model; FedPer: the global base with its own head; Ditto: its own
  personal model, untouched); `arriving(global, kept)`, the server's model as it lands on
  the client (the received model, or for a method that keeps a second model beside the
  personal one (`second_model`), that second model: Ditto's global, DET's deputy);
* `train_round(global, kept, x, y, ctx)`: what the client trains and what it sends;
* `deploys_global` (server): whether a client predicts with the global model (FedAvg) or
  with its personal model (everything personalised).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from baselines.pfl.model import PFLConfig, SplitNet, as_inputs, initial_state, logits_of, net, state_keys
from bench.api import Client, ClientData, ClientUpdate, Message, MethodEnv, Server, TaskInfo, TrainContext, derive_seed
from bench.training import as_tensor, module_arrays, torch_generator, train_epochs

LOCAL = "local."
State = dict[str, np.ndarray]
ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y, logits) -> loss


@dataclass
class Trained:
    """One client's round: what it sends, its personal model, its mean loss, and what else it keeps."""

    upload: State
    personal: State
    loss: float
    extra: State = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # small facts for the server's stats (DET's phases)


def personal_of(kept: State) -> State:
    return {k[len(LOCAL) :]: v for k, v in kept.items() if k.startswith(LOCAL)}


def with_epochs(ctx: TrainContext, epochs: int) -> TrainContext:
    return replace(ctx, train=replace(ctx.train, local_epochs=epochs))


class PFLClient(Client):
    config: PFLConfig
    #: the server's model goes to a second model beside the kept personal one (Ditto's global,
    #: DET's deputy), not into the personal model
    second_model: ClassVar[bool] = False

    def __init__(self, config: PFLConfig, env: MethodEnv) -> None:
        super().__init__(config, env)
        self.keys = state_keys(config, env)

    def keeps(self, key: str) -> bool:
        """Whether the client keeps its own value of `key` when the server's model arrives."""
        return False

    def server_model(self, glob: State) -> State:
        """The model's own arrays out of the server's message (which may carry more beside them)."""
        return {k: glob[k] for k in self.keys}

    def received(self, glob: State, kept: State | None) -> State:
        if kept is None:
            return self.server_model(glob)
        own = personal_of(kept)
        return {k: own[k] if self.keeps(k) else glob[k] for k in self.keys}

    def arriving(self, glob: State, kept: State | None) -> State:
        """The model the server's message becomes on the client before any training: the
        received model, or for a method with a second model, the server's model whole."""
        return self.server_model(glob) if self.second_model else self.received(glob, kept)

    def model(self, state: State, device: str) -> SplitNet:
        return net(self.config, self.env, state, device)

    def fit(
        self,
        params: list[torch.nn.Parameter],
        forward: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        ctx: TrainContext,
        tag: str,
        extra: ExtraLoss | None = None,
    ) -> float:
        """Cross-entropy (plus `extra`) over `ctx.train.local_epochs` passes of seeded minibatches;
        `tag` names the pass so that two passes of one round draw different minibatch orders."""

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            logits = forward(xb)
            loss = F.cross_entropy(logits, yb)
            return loss if extra is None else loss + extra(xb, yb, logits)

        return train_epochs(params, x, y, ctx, loss_fn, torch_generator(derive_seed(ctx.seed, tag)))

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        """Train the received model on the client's data; send what it does not keep."""
        model = self.model(self.received(glob, kept), ctx.device)
        loss = self.fit(list(model.parameters()), model, x, y, ctx, "train", self.extra_loss(glob, model, ctx.device))
        state = module_arrays(model)
        return Trained({k: v for k, v in state.items() if not self.keeps(k)}, state, loss)

    def extra_loss(self, glob: State, model: SplitNet, device: str) -> ExtraLoss | None:
        """A term beside cross-entropy in `train_round` (FedProx's proximal term)."""
        return None

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        x, y = as_inputs(data.x, self.env, ctx.device), as_tensor(data.y, ctx.device, torch.int64)
        tr = self.train_round(payload.arrays, ctx.kept, x, y, ctx)
        kept = {**{LOCAL + k: v for k, v in tr.personal.items()}, **tr.extra}
        return ClientUpdate(arrays=tr.upload, meta=tr.meta, num_samples=len(y), loss=tr.loss, kept=kept)


class PFLServer(Server):
    Config = PFLConfig
    ClientClass: ClassVar[type[PFLClient]] = PFLClient
    config: PFLConfig
    tracks = ("personalized",)
    #: a client predicts with the global model, not its personal one (FedAvg)
    deploys_global: ClassVar[bool] = False

    @classmethod
    def input_for(cls, config: PFLConfig) -> Literal["features", "images", "interactions"]:
        return "images" if config.model == "cnn" else "features"

    def setup(self) -> None:
        self.glob = initial_state(self.config, self.env)
        self.client = self.ClientClass(self.config, self.env)
        self.rounds, self.round = 1, 0
        self._payload: Message | None = None

    def rounds_for_task(self, configured: int, full_participation: bool) -> int:
        self.rounds = configured
        return configured

    def begin_task(self, task: TaskInfo) -> None:
        """One stage: nothing to prepare."""

    def extra_payload(self) -> State:
        """Arrays sent beside the global model."""
        return {}

    def payload_for(self, client_id: int) -> Message:
        if self._payload is None:
            self._payload = Message({**self.glob, **self.extra_payload()})
        return self._payload

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        """The model's arrays the clients sent, combined by the run's rule."""
        keys = [k for k in self.client.keys if updates and k in updates[0].arrays]
        if keys:
            self.glob.update(self.combine(updates, keys, reference=self.glob))
        self.round += 1
        self._payload = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        return logits_of(self.client.model(self.glob, "cpu"), as_inputs(x, self.env, "cpu")).argmax(1)

    def view(self, view: str, kept: State | None, client: int) -> State:
        """The model a request's view names (bench/tracks/personalized.py) for `client`."""
        glob = self.payload_for(client).arrays
        if view == "local" and kept is not None:
            return personal_of(kept)
        if view == "received":
            return self.client.received(glob, kept)
        if view == "arriving":
            return self.client.arriving(glob, kept)
        if kept is None or self.deploys_global:
            return self.client.received(glob, None)
        return personal_of(kept)

    def score(self, requests: dict[str, np.ndarray], kept: list[State | None]) -> np.ndarray:
        state = self.view(str(requests["view"]), kept[0], int(requests["clients"][0]))
        return logits_of(self.client.model(state, "cpu"), as_inputs(requests["x"], self.env, "cpu"))
