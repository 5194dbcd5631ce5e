"""The local executor: clients trained one after another in this process."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bench.config import RuntimeConfig
from bench.runtime.base import ClientJob, ClientResult, Executor, TaskData, pick_device, pin_threads, train_jobs


class LocalExecutor(Executor):
    """In-process and sequential: the reference every other executor must agree with."""

    name = "local"

    def __init__(self, cfg: RuntimeConfig | None = None) -> None:
        import torch

        self.device = pick_device(cfg.device if cfg else "auto", torch.cuda.is_available())
        self.threads = cfg.torch_threads if cfg else None
        self.batched = bool(cfg and cfg.batch_clients)
        self._restore_threads: Callable[[], None] | None = None

    def start(self, client_cls, config, env, train_x, train_y) -> None:
        if self.threads:
            self._restore_threads = pin_threads(self.threads)
        self.client = client_cls(config, env)
        self.train_x, self.train_y = train_x, train_y
        self.data: TaskData | None = None

    def set_task(self, task: int, indices: tuple[np.ndarray, ...], noise: dict[int, tuple[float, int]] | None = None) -> None:
        self.data = None  # the last task's data leaves the device first
        self.data = TaskData(self.train_x, self.train_y, dict(enumerate(indices)), self.device, noise)

    def train(self, jobs: list[ClientJob]) -> list[ClientResult]:
        return train_jobs(self.client, jobs, self.data, self.device, self.batched)

    def stop(self) -> None:
        if self._restore_threads is not None:
            self._restore_threads()
            self._restore_threads = None
