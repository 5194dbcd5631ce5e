"""The executor interface the runner drives, and the factory that picks one."""

from __future__ import annotations

import dataclasses
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, MethodEnv, Server, ServerHandle, TrainContext
from bench.config import AttackConfig, RuntimeConfig
from bench.errors import UserError
from bench.federation import attack_update, flip_labels
from bench.wire import Manifest, manifests


@dataclass
class ClientJob:
    """One client's work of a round: its payload and context, and the attack it mounts when it
    is malicious (the executor applies it around `local_train`; the method never sees it)."""

    client_id: int
    payload: Message
    ctx: TrainContext
    attack: AttackConfig | None = None


@dataclass
class ClientResult:
    update: ClientUpdate
    seconds: float  # the client's own compute time
    retries: int = 0
    kept: dict[str, np.ndarray] | None = None  # what the client keeps on its device (taken out of the update)


class Executor(ABC):
    """Runs a round's client jobs. Data is handed over once per run (`start`) and each
    task's client -> index assignment once per task (`set_task`), so that a job carries only
    a payload and a context."""

    name: str = "base"

    @abstractmethod
    def start(self, client_cls: type[Client], config: MethodConfig, env: MethodEnv, train_x: np.ndarray, train_y: np.ndarray) -> None: ...

    @abstractmethod
    def set_task(self, task: int, indices: tuple[np.ndarray, ...], noise: dict[int, tuple[float, int]] | None = None) -> None:
        """This task's client -> training indices; `noise` (feature-noise skew): client ->
        (std, seed) of the Gaussian noise added to its inputs."""

    def make_server(self, server_cls: type[Server], config: MethodConfig, env: MethodEnv) -> ServerHandle:
        """Where the method's global state lives: in-process here, in a central actor on Ray."""
        return server_cls(config, env)

    def manifests(self, payloads: Sequence[Any]) -> list[Manifest]:
        """What each of the round's payloads is made of, for the wire ledger (bench/wire.py);
        in-process payloads are Messages."""
        return manifests(p.arrays for p in payloads)

    @abstractmethod
    def train(self, jobs: list[ClientJob]) -> list[ClientResult]: ...

    def stop(self) -> None:
        """Release what `start` acquired."""

    run_labels: dict[str, str] = {}

    def label_run(self, labels: dict[str, str]) -> None:
        """What run this executor serves (run_id, method, alpha, seed): names its actors and
        labels its metrics, so concurrent runs stay apart on a dashboard."""
        self.run_labels = dict(labels)

    def round_done(self, method: str, row: dict) -> None:
        """Called by the runner after each round (the Ray executor exports metrics here)."""


class DeviceUnavailable(UserError):
    pass


def executor_kind(cfg: RuntimeConfig) -> str:
    """`local` or `ray`; `auto` is ray when more than one accelerator is visible."""
    if cfg.executor != "auto":
        return cfg.executor
    import torch

    return "ray" if torch.cuda.device_count() > 1 else "local"


def pick_device(requested: str, has_gpu: bool) -> str:
    """The device a worker's clients train on: `runtime.device`, resolved against whether
    this worker has a CUDA GPU (a Ray actor has one only when it was granted a fraction)."""
    if requested == "cpu" or (requested == "auto" and not has_gpu):
        return "cpu"
    if not has_gpu:
        raise DeviceUnavailable(
            "runtime.device=cuda but a client worker sees no CUDA GPU (torch.cuda.is_available() is False, "
            "or the Ray actor holds no GPU); set runtime.device=auto or cpu"
        )
    return "cuda"


def preflight_device(cfg: RuntimeConfig) -> None:
    """Before any run: `runtime.device=cuda` needs CUDA here (local executor) or GPU
    fractions for the client actors (Ray; the actors check CUDA when they start)."""
    if cfg.device != "cuda":
        return
    if executor_kind(cfg) == "ray":
        if cfg.gpus_per_client == 0:
            raise DeviceUnavailable(
                "runtime.device=cuda with the Ray executor: give client actors a GPU with --gpus-per-client (e.g. 0.25)"
            )
        return
    import torch

    pick_device("cuda", torch.cuda.is_available())


class ClusterUnreachable(UserError):
    pass


def preflight_cluster(cfg: RuntimeConfig, timeout_s: float = 5.0) -> None:
    """Before any run: `--address HOST:PORT` must answer, or one line says so within seconds
    (Ray itself retries a dead address for minutes while nothing moves)."""
    if executor_kind(cfg) != "ray" or not cfg.address or cfg.address in ("auto", "local"):
        return
    target = cfg.address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnreachable(f"--address {cfg.address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, the head node's GCS port)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnreachable(
            f"no Ray cluster answers at {cfg.address} ({e.strerror or type(e).__name__}); start one there with "
            f"`ray start --head --port={port}`, check the host and port (the head's GCS port, 6379 by default), or drop --address"
        ) from None


class TaskData:
    """A worker's clients' data for one task, built on first use: with thousands of clients
    and a few sampled per round, only the clients that train get a ClientData (and, on a
    GPU, a copy there, kept for the rest of the task)."""

    def __init__(
        self,
        train_x: np.ndarray,
        train_y: np.ndarray,
        indices: dict[int, np.ndarray],
        device: str,
        noise: dict[int, tuple[float, int]] | None = None,
    ) -> None:
        self.train_x, self.train_y, self.indices, self.device = train_x, train_y, indices, device
        self.noise = noise or {}
        self.built: dict[int, ClientData] = {}

    def __getitem__(self, client_id: int) -> ClientData:
        if client_id not in self.built:
            ix = self.indices[client_id]
            x = self.train_x[ix]
            std, seed = self.noise.get(client_id, (0.0, 0))
            if std > 0:
                x = with_noise(np.asarray(x), std, seed)
            self.built[client_id] = client_data(client_id, x, self.train_y[ix], self.device)
        return self.built[client_id]


def with_noise(x: np.ndarray, std: float, seed: int) -> np.ndarray:
    """NIID-Bench's feature-noise skew: x + N(0, std^2), from a seeded generator. Features get it
    in their own units; uint8 images in units of the pixel range (std 0.1 = 25.5 levels), clipped."""
    noise = np.random.default_rng(seed).normal(0.0, std, size=x.shape)
    if x.dtype == np.uint8:
        return np.clip(x + 255.0 * noise, 0, 255).astype(np.uint8)
    return (x + noise).astype(x.dtype)


def client_data(client_id: int, x: np.ndarray, y: np.ndarray, device: str) -> ClientData:
    """One client's data for a task. On a GPU its inputs are copied there once, when the task
    starts, and stay for all its rounds; on the CPU they stay numpy (no copy)."""
    if device == "cpu":
        return ClientData(client_id, np.asarray(x), np.asarray(y))
    import torch

    return ClientData(client_id, torch.as_tensor(np.asarray(x)).to(device), np.asarray(y))


def pin_threads(n: int) -> Callable[[], None]:
    """Use `n` threads for torch and for numpy's BLAS in this process (the server's numpy
    linear algebra gives other bits with another thread count, so one count everywhere is
    what makes the local and Ray executors agree to the bit); returns the undo."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    limits = threadpool_limits(limits=n, user_api="blas")

    def restore() -> None:
        torch.set_num_threads(before)
        limits.restore_original_limits()

    return restore


def train_jobs(client: Client, jobs: list[ClientJob], data: TaskData, device: str, batched: bool) -> list[ClientResult]:
    """A worker's jobs of a round, in order. With `batched` (runtime.batch_clients) and a
    client class that can (`batched = True`), the jobs that share a payload train together
    in one stacked computation; otherwise one after another."""
    if not (batched and client.batched):
        return [timed_local_train(client, j, data, device) for j in jobs]
    groups: dict[int, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(id(j.payload), []).append(i)
    results: dict[int, ClientResult] = {}
    for ix in groups.values():
        results.update(zip(ix, timed_local_train_batch(client, [jobs[i] for i in ix], data, device)))
    return [results[i] for i in range(len(jobs))]


def timed_local_train(client: Client, job: ClientJob, data: TaskData, device: str) -> ClientResult:
    """local_train on `device`, timed (a GPU's queued work is waited for, so the time is real)."""
    t0 = time.perf_counter()
    update = client.local_train(job.payload, _job_data(job, data), dataclasses.replace(job.ctx, device=device))
    return _result(job, update, _elapsed(t0, device))


def timed_local_train_batch(client: Client, jobs: list[ClientJob], data: TaskData, device: str) -> list[ClientResult]:
    """`timed_local_train` for clients that share a payload, trained together; the batch's
    time is split evenly among its clients."""
    t0 = time.perf_counter()
    updates = client.local_train_batch(
        jobs[0].payload, [_job_data(j, data) for j in jobs], [dataclasses.replace(j.ctx, device=device) for j in jobs]
    )
    seconds = _elapsed(t0, device) / max(len(jobs), 1)
    return [_result(j, update, seconds) for j, update in zip(jobs, updates)]


def _job_data(job: ClientJob, data: TaskData) -> ClientData:
    """The client's data, its labels flipped when it is a label-flipping attacker."""
    attack = job.attack
    return flip_labels(data[job.client_id]) if attack is not None and attack.kind == "label_flip" else data[job.client_id]


def _elapsed(t0: float, device: str) -> float:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _result(job: ClientJob, update: ClientUpdate, seconds: float) -> ClientResult:
    """The update as sent: what the client keeps taken out of it, changed by the client's
    attack, if any, and marked with its sender."""
    kept, update.kept = update.kept, None
    if job.attack is not None:
        update = attack_update(job.attack, job.payload, update, job.ctx.seed)
    update.client_id = job.ctx.client_id
    return ClientResult(update, seconds, kept=kept)
