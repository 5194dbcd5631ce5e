"""The contract of the personalised track, checked for every method that runs it: each runs
end to end with its per-client table, gives the same numbers for the same seed and under Ray
(what clients keep on their devices included), turns a typo in its section into one error
line, and beats chance."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from bench.api import available_methods, get_method
from bench.cli import app
from tests.conftest import numbers
from tests.personalized.conftest import FAST, pfl_cfg, run_pfl

METHODS = sorted(m for m, cls in available_methods().items() if "personalized" in cls.tracks)
NO_MODEL_SHARED = {"local_only", "fedproto"}  # nothing for the aggregation rule to combine


def test_the_track_has_its_methods():
    assert {
        "local_only",
        "fedavg_pfl",
        "fedavg_ft",
        "fedprox_pfl",
        "fedper",
        "fedrep",
        "ditto",
        "pfa",
        "det",
        "pfa_det",
        "cpa",
        "fml",
        "fedproto",
        "apfl",
        "fedamp_attention",
    } <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_runs_end_to_end_with_its_client_table(method, pfl_data):
    spec, out = run_pfl(method, pfl_data, *FAST)
    rows = out.tables["clients"]
    evaluated = sorted({r["round"] for r in out.tables["rounds"] if r["acc_seen"] is not None})
    assert sorted({r["round"] for r in rows}) == evaluated == [0, 1, 2]
    new = {r["client"] for r in rows if r["new"]}
    assert len(new) == 1 and all(r["round"] == 2 for r in rows if r["new"])  # the new client joins at the end
    assert all(0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0 for r in rows)
    s = out.summary
    assert s["run_id"] == spec.run_id
    assert all(
        math.isfinite(s[m])
        for m in ("acc_mean", "acc_weighted", "acc_worst10", "acc_mean_at_val", "val_acc", "retrogress", "retrogress_shared", "new_acc")
    )
    assert s["acc_worst10"] <= s["acc_mean"]
    aggregated = {int(k) for r in out.tables["rounds"] if r["agg_shares"] for k in json.loads(r["agg_shares"])}
    assert not aggregated & new and (aggregated or method in NO_MODEL_SHARED)  # the new client is never aggregated


@pytest.mark.parametrize("method", METHODS)
def test_the_same_seed_gives_the_same_numbers(method, pfl_data):
    _, first = run_pfl(method, pfl_data, *FAST)
    _, again = run_pfl(method, pfl_data, *FAST)
    assert numbers(first) == numbers(again)
    _, other = run_pfl(method, pfl_data, *FAST, "seed=1")
    assert other.summary["run_id"] != first.summary["run_id"]


@pytest.mark.parametrize("method", METHODS)
def test_ray_gives_the_local_numbers(method, pfl_data, cluster):
    from bench.runtime.ray_executor import RayExecutor

    pinned = (*FAST, "runtime.cpus_per_client=0", "runtime.num_actors=2")
    _, local = run_pfl(method, pfl_data, *pinned)
    cfg = pfl_cfg(*pinned, "runtime.executor=ray")
    _, remote = run_pfl(method, pfl_data, *pinned, "runtime.executor=ray", executor=RayExecutor(cfg.runtime))
    assert numbers(remote) == numbers(local)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_beats_chance(method, pfl_data):
    """Six classes: chance is 1/6; every client's data is skewed, so a personal model does better still."""
    _, out = run_pfl(method, pfl_data, "training.rounds=6", "eval.every=3")
    assert out.summary["acc_mean"] > 0.35 and out.summary["new_acc"] > 1 / 6


@pytest.mark.parametrize("method", METHODS)
def test_a_typo_in_its_config_section_is_one_error_line(method, tmp_path):
    res = CliRunner().invoke(
        app,
        ["run", "-c", "pfl_cifar100", "--methods", method, "--out", str(tmp_path), "--set", f"methods.{method}.no_such_knob=1"],
    )
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "unknown key" in lines[0], res.output


@pytest.mark.parametrize("method", METHODS)
def test_the_method_describes_itself(method):
    cls = get_method(method)
    assert cls.name == method and cls.summary and cls.tracks == ("personalized",)
    assert cls.input_for(cls.Config()) == "features" and cls.input_for(cls.Config(model="cnn")) == "images"
