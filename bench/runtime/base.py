"""The executor interface the runner drives, and the factory that picks one."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, MethodEnv, Server, TrainContext
from bench.config import RuntimeConfig


@dataclass
class ClientJob:
    client_id: int
    payload: Message
    ctx: TrainContext


@dataclass
class ClientResult:
    update: ClientUpdate
    seconds: float  # the client's own compute time
    retries: int = 0


class Executor(ABC):
    """Runs a round's client jobs. Data is handed over once per run (`start`) and each
    task's client -> index assignment once per task (`set_task`), so that a job carries only
    a payload and a context."""

    name: str = "base"

    @abstractmethod
    def start(
        self, client_cls: type[Client], config: MethodConfig, env: MethodEnv, train_x: np.ndarray, train_y: np.ndarray
    ) -> None: ...

    @abstractmethod
    def set_task(self, task: int, indices: tuple[np.ndarray, ...]) -> None: ...

    def make_server(self, server_cls: type[Server], config: MethodConfig, env: MethodEnv) -> Server:
        """Where the method's global state lives: in-process here, in a central actor on Ray."""
        return server_cls(config, env)

    @abstractmethod
    def train(self, jobs: list[ClientJob]) -> list[ClientResult]: ...

    def stop(self) -> None:
        """Release what `start` acquired."""

    def round_done(self, method: str, row: dict) -> None:
        """Called by the runner after each round (the Ray executor exports metrics here)."""


def timed_local_train(client: Client, payload: Message, data: ClientData, ctx: TrainContext) -> ClientResult:
    t0 = time.perf_counter()
    update = client.local_train(payload, data, ctx)
    return ClientResult(update, time.perf_counter() - t0)


class LocalExecutor(Executor):
    """In-process and sequential: the reference every other executor must agree with."""

    name = "local"

    def start(self, client_cls, config, env, train_x, train_y) -> None:
        self.client = client_cls(config, env)
        self.train_x, self.train_y = train_x, train_y
        self.data: dict[int, ClientData] = {}

    def set_task(self, task: int, indices: tuple[np.ndarray, ...]) -> None:
        self.data = {k: ClientData(k, np.asarray(self.train_x[ix]), self.train_y[ix]) for k, ix in enumerate(indices)}

    def train(self, jobs: list[ClientJob]) -> list[ClientResult]:
        return [timed_local_train(self.client, j.payload, self.data[j.client_id], j.ctx) for j in jobs]


def make_executor(cfg: RuntimeConfig) -> Executor:
    """`local`, `ray`, or `auto` (ray when more than one accelerator is visible)."""
    kind = cfg.executor
    if kind == "auto":
        import torch

        kind = "ray" if torch.cuda.device_count() > 1 else "local"
    if kind == "local":
        return LocalExecutor()
    from bench.runtime.ray_executor import RayExecutor

    return RayExecutor(cfg)
