"""The Ray executor: client actors on (fractional) GPUs, data put once, faults retried.

* The training features and labels are `ray.put` once per run; actors read them zero-copy
  from the object store and keep their own clients' slices between rounds (a sticky
  client -> actor assignment: client k lives on actor k mod n).
* A round's payload arrays are deduplicated by identity and put once each, so a shared
  payload (a shared head, projector or prompt bank) is stored once and passed by
  reference to every client, not copied per client.
* Each actor asks for `gpus_per_client` of a GPU and `cpus_per_client` CPUs (with
  `--gpus-per-client 0.25` four actors share a GPU) and sets torch's thread count to match.
  An actor granted a GPU fraction trains its clients on that GPU (`runtime.device=auto`)
  and keeps their data there for the whole task.
* The central actor runs on the driver's node (where the preflight checked the method's files
  and caches it reads), and every actor gets the driver's settings that matter to methods
  (API keys, the harness's FEDAME_/HF_ variables, the prefixes a method declares in
  `Server.worker_env`): on an existing cluster (`--address`) workers do not
  inherit the driver's environment. They travel as constructor arguments, not in a
  runtime_env the dashboard would display.
* Client updates go from the client actor to the central actor through the object store;
  the driver sees only a small header (sample count, loss, bytes) and the reference, so
  an update is never pulled into the driver and sent out again.
* A dead actor is replaced by a fresh one with the same constructor arguments and its
  clients' data; its in-flight client job is resubmitted, up to `max_retries` times, and
  each retry is counted in the rounds table. Results are identical because local_train is a pure function of
  (payload, data, context).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.api import ClientUpdate, Message
from bench.config import RuntimeConfig
from bench.errors import UserError
from bench.runtime.base import ClientJob, ClientResult, DeviceUnavailable, Executor, TaskData, pick_device, pin_threads, train_jobs
from bench.wire import manifests

log = logging.getLogger(__name__)


class RayUnavailable(UserError):
    pass


_INIT_LOCK = threading.Lock()


def ensure_ray(cfg: RuntimeConfig):
    """Connect to `--address`, or start a local cluster sized to this machine (once per
    process, also when a sweep's concurrent runs all ask at the same moment)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    with _INIT_LOCK:
        if ray.is_initialized():
            return ray
        return _init_ray(ray, cfg)


def _init_ray(ray, cfg: RuntimeConfig):
    try:
        ctx = ray.init(address=cfg.address, ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise RayUnavailable(f"cannot join the Ray cluster at {cfg.address} ({e}); check --address or drop it") from None
    url = getattr(ctx, "dashboard_url", None)
    from bench.progress import console

    console.print(f"[bold]ray[/] cluster resources {ray.cluster_resources()}; dashboard: {'http://' + url if url else 'not running'}")
    if url and token_auth_on():
        console.print(f"[bold]ray[/] the dashboard asks for a token: {token_location(os.environ)}", highlight=False, soft_wrap=True)
    return ray


def token_auth_on() -> bool:
    """Whether this Ray session uses token authentication (on by default for a cluster
    `ray.init` starts since Ray 2.5x; `RAY_AUTH_MODE=disabled` turns it off)."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # a Ray without token authentication
        return False
    return get_authentication_mode() == AuthenticationMode.TOKEN


def token_location(environ: dict[str, str]) -> str:
    """Where Ray reads the dashboard token from, in the order Ray looks."""
    if environ.get("RAY_AUTH_TOKEN"):
        return "it is the value of $RAY_AUTH_TOKEN"
    path = environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return f"it is in {path} (`ray get-auth-token` prints it)"


FORWARDED_PREFIXES = ("FEDAME_", "HF_", "TRANSFORMERS_")


def forwarded_environ(config: Any, prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The driver's environment variables a method may read on a worker: the harness's prefixes
    above and the method's own (`Server.worker_env`), any *_API_KEY, and every variable the
    method's config names in a field ending in `_env` (an API key's variable, say)."""
    named: set[str] = set()

    def scan(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, str) and k.endswith("_env"):
                    named.add(v)
                scan(v)

    scan(config.model_dump() if hasattr(config, "model_dump") else {})
    wanted = FORWARDED_PREFIXES + tuple(prefixes)
    return {k: v for k, v in os.environ.items() if k in named or k.startswith(wanted) or k.endswith("_API_KEY")}


INLINE_BYTES = 64 * 1024  # arrays up to this size travel inside the call, not through the object store


def put_once(messages: list[Message]) -> list[dict[str, Any]]:
    """For each message, name -> an object-store reference, or the array itself when it is
    small (a ray.put costs about as much as a whole actor call, and a small head's rounds
    are made of little else). An array shared by several messages is put once. The caller
    keeps `messages` alive, so no id() can be reused."""
    import ray

    by_id: dict[int, Any] = {}
    out = []
    for msg in messages:
        refs = {}
        for name, arr in msg.arrays.items():
            if id(arr) not in by_id:
                by_id[id(arr)] = arr if arr.nbytes <= INLINE_BYTES else ray.put(arr)
            refs[name] = by_id[id(arr)]
        out.append(refs)
    return out


_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    if not _METRICS:
        from ray.util.metrics import Counter, Gauge

        keys = ("run_id", "method", "alpha", "seed")
        _METRICS.update(
            rounds=Counter("fedame_rounds_completed", "federated rounds completed", tag_keys=keys),
            updates=Counter("fedame_client_updates", "client updates aggregated", tag_keys=keys),
            bytes=Counter("fedame_bytes_moved", "payload + update bytes moved", tag_keys=keys),
            retries=Counter("fedame_client_retries", "client jobs retried after an actor failure", tag_keys=keys),
            accuracy=Gauge("fedame_acc_seen", "latest accuracy on all seen classes", tag_keys=keys),
        )
    return _METRICS


class ClientActor:
    """Hosts the virtual clients assigned to it; built once per run."""

    def __init__(
        self,
        client_cls,
        config,
        env,
        train_x: np.ndarray,
        train_y: np.ndarray,
        threads: int,
        device: str,
        environ: dict[str, str],
        batched: bool = False,
    ) -> None:
        import ray
        import torch

        self.batched = batched
        os.environ.update(environ)
        pin_threads(max(1, threads))
        # Ray sets CUDA_VISIBLE_DEVICES to the granted GPU, so "cuda" is that one
        self.device = pick_device(device, bool(ray.get_gpu_ids()) and torch.cuda.is_available())
        self.client = client_cls(config, env)
        self.train_x, self.train_y = train_x, train_y  # zero-copy views into the object store
        self.data: TaskData | None = None

    def set_task(self, indices: dict[int, np.ndarray], noise: dict[int, tuple[float, int]] | None = None) -> None:
        self.data = None  # the last task's data leaves the device first
        self.data = TaskData(self.train_x, self.train_y, indices, self.device, noise)

    def describe(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "device": self.device,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "node": ray.get_runtime_context().get_node_id(),
        }

    def train(self, jobs: list[ClientJob], array_refs: list[dict[str, Any]]) -> tuple:
        """This actor's jobs of a round in one call (called with num_returns = 1 + len(jobs)):
        the headers for the driver, then each update for the central actor. The payloads'
        arrays are fetched once for all the jobs that share them."""
        import ray

        unique = list({id(r): r for refs in array_refs for r in refs.values() if isinstance(r, ray.ObjectRef)}.values())
        fetched = dict(zip(map(id, unique), ray.get(unique))) if unique else {}
        payloads: dict[tuple, Message] = {}  # jobs given the same arrays share one payload (batched training groups by it)
        full = []
        for job, refs in zip(jobs, array_refs):
            key = (tuple((n, id(r)) for n, r in refs.items()), repr(job.payload.meta))
            if key not in payloads:
                # private copies: the object store's arrays are read-only and training reads them as tensors
                payloads[key] = Message({n: np.array(fetched.get(id(r), r)) for n, r in refs.items()}, job.payload.meta)
            full.append(dataclasses.replace(job, payload=payloads[key]))
        results = train_jobs(self.client, full, self.data, self.device, self.batched)
        headers = [ClientResult(RemoteUpdate(None, r.update.nbytes, r.update.num_samples, r.update.loss), r.seconds) for r in results]
        return (headers, *(r.update for r in results))


@dataclass
class RemotePayload:
    """A payload that already lives in the object store: array name -> reference."""

    refs: dict[str, Any]
    meta: dict[str, Any]
    nbytes: int
    manifest: Any  # bench.wire.Manifest: what the runner's wire ledger charges


@dataclass
class RemoteUpdate:
    """What the driver holds of a client update: its reference and the numbers the rounds
    table needs. The arrays stay in the object store until the central actor reads them."""

    ref: Any
    nbytes: int
    num_samples: int
    loss: float


class ServerHost:
    """The central actor: holds a method's server (an expert pool with its router and prompts,
    or a single parameter group), serves each client only
    what it needs straight from the object store, and aggregates what comes back."""

    def __init__(self, server_cls, config, env, environ: dict[str, str], threads: int | None = None) -> None:
        os.environ.update(environ)
        if threads:
            pin_threads(threads)
        self.server = server_cls(config, env)

    def call(self, hook: str, *args):
        return getattr(self.server, hook)(*args)

    def node(self) -> str:
        """The Ray node this actor runs on (pinned to the driver's)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def payloads(self, client_ids: list[int]) -> list[RemotePayload]:
        msgs = [self.server.payload_for(k) for k in client_ids]
        return [RemotePayload(refs, m.meta, m.nbytes, man) for m, refs, man in zip(msgs, put_once(msgs), manifests(m.arrays for m in msgs))]

    def aggregate(self, *updates: ClientUpdate) -> tuple[dict, dict]:
        """Aggregate straight from the client actors' outputs (passed as top-level references,
        so Ray hands them over resolved: large ones from the object store, small ones inline
        from the driver that owns them, with no borrowing round trips); the round's stats and
        aggregation report come back in the same answer (one call per round, not three)."""
        self.server.aggregate(list(updates))
        return self.server.stats(), self.server.aggregation_report()


class RemoteServer:
    """The runner's handle on the central actor (a ServerHandle): each hook is a call to the
    actor, none answered here."""

    def __init__(self, ray, server_cls, config, env, name: str | None = None, threads: int | None = None) -> None:
        self.ray = ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = (
            ray.remote(ServerHost)
            .options(num_cpus=0, scheduling_strategy=here, name=name)
            .remote(server_cls, config, env, forwarded_environ(config, server_cls.worker_env), threads)
        )
        self._stats: dict | None = None  # the last aggregation's stats (until an evaluation may change them)
        self._report: dict | None = None  # and its aggregation report (until read)

    def _call(self, hook: str, *args):
        return self.ray.get(self.actor.call.remote(hook, *args))

    def setup(self) -> None:
        self._call("setup")

    def begin_task(self, task) -> None:
        self._call("begin_task", task)

    def rounds_for_task(self, configured: int, full_participation: bool) -> int:
        return self._call("rounds_for_task", configured, full_participation)

    def payload_for(self, client_id: int):
        return self.payloads_for([client_id])[0]

    def payloads_for(self, client_ids: list[int]) -> list[RemotePayload]:
        """One actor call for the round's sampled clients (never for clients not sampled)."""
        return self.ray.get(self.actor.payloads.remote(list(client_ids)))

    def aggregate(self, updates: list[RemoteUpdate]) -> None:
        self._stats, self._report = self.ray.get(self.actor.aggregate.remote(*[u.ref for u in updates]))

    def predict(self, x):
        self._stats = None  # a method may count what its evaluation saw (MoE-Adapter's DDAS share)
        return self._call("predict", np.asarray(x))

    def end_task(self) -> None:
        self._call("end_task")

    def stats(self):
        if self._stats is not None:  # as the aggregation left them, unless an evaluation came since
            return self._stats
        return self._call("stats")

    def aggregation_report(self):
        if self._report is not None:  # read once: the report covers the round since the last one
            report, self._report = self._report, None
            return report
        return self._call("aggregation_report")

    def extra_rows(self):
        return self._call("extra_rows")

    def state(self) -> bytes:
        return self._call("state")

    def load_state(self, blob: bytes) -> None:
        self._call("load_state", blob)

    def stop(self) -> None:
        self.ray.kill(self.actor)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        self.ray = ensure_ray(cfg)
        self.actors: list[Any] = []
        self.indices: dict[int, np.ndarray] = {}
        self.noise: dict[int, tuple[float, int]] = {}
        self._token = uuid.uuid4().hex[:4]
        self._restarts: dict[int, int] = {}

    def actor_name(self, role: str) -> str | None:
        """e.g. `M a=0.5 s=0 client actor 3 [M-cifar100-a0.5-s0-1a2b3c4d5e #9f2c]` for a method M: the
        dashboard's Actors view reads as the sweep (the token keeps a rerun's names unique)."""
        lab = self.run_labels
        if not lab:
            return None
        return f"{lab['method']} a={lab['alpha']} s={lab['seed']} {role} [{lab['run_id']} #{self._token}]"

    def make_server(self, server_cls, config, env) -> RemoteServer:
        self._worker_env = server_cls.worker_env
        self.server = RemoteServer(self.ray, server_cls, config, env, self.actor_name("central actor"), self.cfg.torch_threads)
        return self.server

    def start(self, client_cls, config, env, train_x, train_y) -> None:
        ray = self.ray
        self.n = self._fitting_actors(self.cfg.num_actors or env.num_clients, env.num_clients)
        # features and labels go into the object store once; every actor reads them zero-copy
        self._ctor = (client_cls, config, env, ray.put(np.asarray(train_x)), ray.put(np.asarray(train_y)))
        self._environ = forwarded_environ(config, getattr(self, "_worker_env", ()))
        self._reserve()
        self.actors = [self._new_actor(a) for a in range(self.n)]
        self.devices = self._check_devices()

    def _reserve(self) -> None:
        """Reserve all of this run's actors at once (a placement group, one bundle per actor).
        Runs of a sweep that share the cluster then wait for each other whole; placed actor
        by actor, two runs could each hold half the GPUs and wait for the other forever."""
        bundle = {k: v for k, v in (("CPU", self.cfg.cpus_per_client), ("GPU", self.cfg.gpus_per_client)) if v > 0}
        self.pg = None
        if bundle:  # actors that ask for nothing can always be placed
            from ray.util.placement_group import placement_group

            self.pg = placement_group([bundle] * self.n, strategy="PACK")
            self.ray.get(self.pg.ready())

    def _check_devices(self) -> list[dict[str, Any]]:
        """Wait for the actors to come up; say where their clients train."""
        from ray.exceptions import RayActorError

        try:
            info = self.ray.get([a.describe.remote() for a in self.actors])
        except RayActorError as e:
            if isinstance(e.__cause__, DeviceUnavailable) or "DeviceUnavailable" in str(e):
                self.stop()
                raise DeviceUnavailable(str(e.__cause__ or e).strip().splitlines()[-1]) from None
            raise
        devices = sorted({d["device"] for d in info})
        if self.cfg.gpus_per_client > 0 and devices == ["cpu"]:
            log.warning(
                "client actors hold %g of a GPU each but see no CUDA device (logical GPUs only?); they train on the CPU",
                self.cfg.gpus_per_client,
            )
        return info

    def _fitting_actors(self, wanted: int, clients: int) -> int:
        """As many actors as asked for, but no more than the cluster can hold at once (more
        would wait forever for resources while their clients' jobs wait on them)."""
        total = self.ray.cluster_resources()
        n = min(wanted, clients)
        for key, per in (("CPU", self.cfg.cpus_per_client), ("GPU", self.cfg.gpus_per_client)):
            if per > 0:
                fit = int(total.get(key, 0) // per)
                if fit < 1:
                    raise RayUnavailable(
                        f"the Ray cluster has {total.get(key, 0):g} {key}s, less than one client actor's "
                        f"{per:g}; lower --gpus-per-client / runtime.cpus_per_client or join a bigger cluster"
                    )
                n = min(n, fit)
        return n

    def _new_actor(self, a: int):
        """Actor `a`, in bundle `a` of the run's reservation."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        threads = self.cfg.torch_threads or (max(1, math.floor(self.cfg.cpus_per_client)) if self.cfg.cpus_per_client else 1)
        where = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=a) if self.pg else None
        return (
            self.ray.remote(ClientActor)
            .options(
                num_cpus=self.cfg.cpus_per_client,
                num_gpus=self.cfg.gpus_per_client,
                max_restarts=0,
                scheduling_strategy=where,
                name=self.actor_name(f"client actor {a}" + (f" restart {self._restarts[a]}" if self._restarts.get(a) else "")),
            )
            .remote(*self._ctor, threads, self.cfg.device, self._environ, self.cfg.batch_clients)
        )

    def actor_of(self, client_id: int) -> int:
        return client_id % self.n

    def _clients_of(self, a: int) -> tuple[dict[int, np.ndarray], dict[int, tuple[float, int]]]:
        """Actor `a`'s clients: their indices and (feature-noise skew) their noise."""
        mine = {k: ix for k, ix in self.indices.items() if self.actor_of(k) == a}
        return mine, {k: v for k, v in self.noise.items() if k in mine}

    def set_task(self, task: int, indices: tuple[np.ndarray, ...], noise: dict[int, tuple[float, int]] | None = None) -> None:
        self.indices, self.noise = dict(enumerate(indices)), noise or {}
        self.ray.get([actor.set_task.remote(*self._clients_of(a)) for a, actor in enumerate(self.actors)])

    def manifests(self, payloads) -> list:
        """Payloads the central actor served carry their manifests; the driver never sees their arrays."""
        return [p.manifest for p in payloads]

    def _put_arrays(self, jobs: list[ClientJob]) -> list[dict[str, Any]]:
        """Each job's name -> reference; payloads served by the central actor are stored already."""
        local = [j.payload for j in jobs if not isinstance(j.payload, RemotePayload)]
        refs = iter(put_once(local))
        return [j.payload.refs if isinstance(j.payload, RemotePayload) else next(refs) for j in jobs]

    def _submit(self, a: int, jobs: list[ClientJob], refs: list[dict[str, Any]]) -> list:
        """Actor `a`'s jobs of the round in one call: [headers ref, update ref per job]."""
        light = [dataclasses.replace(j, payload=Message({}, j.payload.meta)) for j in jobs]  # arrays travel as refs only
        return self.actors[a].train.options(num_returns=1 + len(jobs)).remote(light, refs)

    def train(self, jobs: list[ClientJob]) -> list[ClientResult]:
        """One call per actor per round (its clients' jobs together); an actor that dies is
        replaced and its jobs of the round are retried, each retry counted per job."""
        from ray.exceptions import RayActorError

        refs = self._put_arrays(jobs)
        by_actor: dict[int, list[int]] = {}
        for i, j in enumerate(jobs):
            by_actor.setdefault(self.actor_of(j.client_id), []).append(i)
        futures = {a: self._submit(a, [jobs[i] for i in ix], [refs[i] for i in ix]) for a, ix in by_actor.items()}
        results: list[ClientResult | None] = [None] * len(jobs)
        for a, ix in by_actor.items():
            retries = 0
            while True:
                headers_ref, *update_refs = futures[a]
                try:
                    headers = self.ray.get(headers_ref)
                    break
                except RayActorError as e:
                    retries += 1
                    clients = [jobs[i].client_id for i in ix]
                    if retries > self.cfg.max_retries:
                        raise RuntimeError(f"clients {clients} failed {retries} times: {e}") from e
                    log.warning(
                        "clients %s: actor failed (%s); restoring and retrying (%d/%d)",
                        clients,
                        type(e).__name__,
                        retries,
                        self.cfg.max_retries,
                    )
                    self._restore(a)
                    futures[a] = self._submit(a, [jobs[i] for i in ix], [refs[i] for i in ix])
            for i, res, update_ref in zip(ix, headers, update_refs):
                res.retries = retries
                res.update.ref = update_ref
                results[i] = res
        return results

    def _restore(self, a: int) -> None:
        """Replace a dead actor by a fresh one (same constructor arguments) holding the same
        clients' data; the driver keeps everything needed to rebuild it."""
        try:
            self.ray.kill(self.actors[a], no_restart=True)
        except Exception:  # already gone
            pass
        self._restarts[a] = self._restarts.get(a, 0) + 1
        self.actors[a] = self._new_actor(a)
        self.ray.get(self.actors[a].set_task.remote(*self._clients_of(a)), timeout=600)

    def round_done(self, method: str, row: dict) -> None:
        """Export progress to the Ray dashboard's metrics (ray.util.metrics)."""
        m = _metrics()
        tags = {"run_id": "", "alpha": "", "seed": "", **self.run_labels, "method": method}
        m["rounds"].inc(1, tags=tags)
        m["updates"].inc(row["clients_used"], tags=tags)
        m["bytes"].inc(row["bytes_up"] + row["bytes_down"], tags=tags)
        if row["retries"]:
            m["retries"].inc(row["retries"], tags=tags)
        if row["acc_seen"] is not None:
            m["accuracy"].set(row["acc_seen"], tags=tags)

    def stop(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
        if getattr(self, "server", None) is not None:
            self.server.stop()
            self.server = None
