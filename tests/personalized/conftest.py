"""Shared fixtures of the personalised-track tests: the synthetic dataset's features and a runner."""

from __future__ import annotations

import pytest

from bench.data import load_dataset
from bench.features import FeatureStore
from bench.loader import load_config
from bench.runner import RunSpec, execute_run
from bench.runtime import LocalExecutor

#: the smoke config as a personalised scenario: 5 clients (one of them new), Dirichlet 0.5
BASE = ("track=personalized", "scenario.tasks=null", "scenario.num_clients=5", "scenario.new_clients=1", "runtime.torch_threads=1")
FAST = ("training.rounds=3", "eval.every=1")


def pfl_cfg(*overrides: str):
    return load_config("smoke", [*BASE, *overrides])


@pytest.fixture(scope="session")
def pfl_data(tmp_path_factory):
    """(dataset, feature store, cache dir): the features are computed once per session."""
    cfg = pfl_cfg()
    ds = load_dataset(cfg.data, None)
    cache = tmp_path_factory.mktemp("pfl-cache")
    return ds, FeatureStore(ds, cfg.backbone, cache), cache


def run_pfl(method: str, pfl_data, *overrides: str, executor=None, **kw):
    ds, store, cache = pfl_data
    cfg = pfl_cfg(*overrides)
    spec = RunSpec(method, cfg)
    return spec, execute_run(spec, ds, store, executor or LocalExecutor(cfg.runtime), str(cache), **kw)
