"""Shared fixtures of the recommendation tests: the generated MovieLens world and a runner."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.data.movielens import load_movielens
from bench.features import FeatureStore
from bench.loader import load_config
from bench.runner import RunSpec, execute_run
from bench.runtime import LocalExecutor
from tests.recommendation.world import rec_overrides, world


@pytest.fixture(scope="session")
def rec_data(tmp_path_factory):
    """(data dir, dataset, feature store, a cache dir shared by the session's runs: the text
    features are computed once)."""
    root = world(tmp_path_factory.mktemp("ml"))
    cfg = load_config("ml100k", rec_overrides(root))
    ds = load_movielens(root)
    return root, ds, FeatureStore(ds, cfg.backbone, tmp_path_factory.mktemp("features")), tmp_path_factory.mktemp("cache")


def run_rec(method: str, rec_data, *overrides: str, executor=None, **kw):
    root, ds, store, cache = rec_data
    cfg = load_config("ml100k", rec_overrides(root, *overrides))
    spec = RunSpec(method, cfg)
    return spec, execute_run(spec, ds, store, executor or LocalExecutor(cfg.runtime), str(cache), **kw)


def rec_cfg(root: Path, *overrides: str):
    return load_config("ml100k", rec_overrides(root, *overrides))
