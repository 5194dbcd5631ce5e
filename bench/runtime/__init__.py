"""Executors: where `local_train` runs. `local` (in-process) and `ray` (actors) run the same
method code and give the same numbers for the same seed."""

from bench.runtime.base import ClientJob, ClientResult, Executor, make_executor

__all__ = ["ClientJob", "ClientResult", "Executor", "make_executor"]
