"""Executors: where `local_train` runs. `local` (in-process) and `ray` (actors) run the same
method code and give the same numbers for the same seed. The factory lives here, so the
executors import the shared pieces in `base` and never each other."""

from __future__ import annotations

from bench.config import RuntimeConfig
from bench.runtime.base import ClientJob, ClientResult, Executor, ServerHandle, executor_kind
from bench.runtime.local import LocalExecutor


def make_executor(cfg: RuntimeConfig) -> Executor:
    if executor_kind(cfg) == "local":
        return LocalExecutor(cfg)
    from bench.runtime.ray_executor import RayExecutor  # imports ray: only when asked for

    return RayExecutor(cfg)


__all__ = ["ClientJob", "ClientResult", "Executor", "LocalExecutor", "ServerHandle", "executor_kind", "make_executor"]
