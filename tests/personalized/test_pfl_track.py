"""The personalised scenario and its metrics: who holds which data, how the figures are made."""

from __future__ import annotations

import numpy as np
import pytest

from bench.config import ConfigError
from bench.tracks.personalized import Personalized, client_splits, deal_test, long_tailed, worst_share
from tests.personalized.conftest import BASE, FAST, pfl_cfg, run_pfl


def labels(n_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def test_each_client_holds_its_own_train_val_and_test_data():
    train_y, test_y = labels(10, 50), labels(10, 20)
    cfg = pfl_cfg("scenario.num_clients=6", "scenario.new_clients=0", "scenario.alpha=0.3", "scenario.client_val_fraction=0.2")
    sp = client_splits(cfg, train_y, test_y)
    used = np.concatenate([*sp.train, *sp.val])
    assert len(used) == len(np.unique(used)) == len(train_y)  # every sample once, train and val disjoint
    tests = np.concatenate(sp.test)
    assert len(tests) == len(np.unique(tests)) == len(test_y)  # test samples dealt out, none shared
    for tr, va, te in zip(sp.train, sp.val, sp.test):
        assert abs(len(va) - 0.2 * (len(tr) + len(va))) <= 1
        held = np.bincount(train_y[np.concatenate([tr, va])], minlength=10)
        got = np.bincount(test_y[te], minlength=10)
        assert set(np.flatnonzero(got)) <= set(np.flatnonzero(held))  # no test class the client never trained on
    again = client_splits(cfg, train_y, test_y)
    assert all(np.array_equal(a, b) for a, b in zip(sp.test, again.test))  # a pure function of the seed


def test_test_samples_follow_each_clients_label_distribution():
    train_y, test_y = labels(4, 100), labels(4, 40)
    parts = [
        np.arange(0, 75),
        np.concatenate([np.arange(75, 100), np.arange(100, 200)]),
    ]  # client 0: class 0; client 1: the rest of class 0, class 1
    out = deal_test(parts, train_y, test_y, np.random.default_rng(0))
    assert np.bincount(test_y[out[0]], minlength=4).tolist() == [30, 0, 0, 0]  # 75% of class 0's test samples
    assert np.bincount(test_y[out[1]], minlength=4).tolist() == [10, 40, 0, 0]  # classes 2, 3 trained by nobody: unused


def test_long_tail_keeps_a_geometric_share_of_each_class():
    y = labels(5, 100)
    keep = long_tailed(y, 10.0, np.random.default_rng(0))
    counts = np.bincount(y[keep], minlength=5)
    assert counts[0] == 100 and counts[-1] == 10 and np.all(np.diff(counts) < 0)
    assert np.array_equal(long_tailed(y, 1.0, np.random.default_rng(0)), np.arange(500))


def test_worst_share_is_the_mean_of_the_lowest_tenth():
    acc = np.array([0.9, 0.1, 0.5, np.nan, *[0.8] * 16])
    assert worst_share(acc) == pytest.approx((0.1 + 0.5) / 2)  # 19 finite clients: the lowest 2


def test_the_track_refuses_a_global_validation_slice_and_too_many_new_clients(pfl_data):
    ds = pfl_data[0]
    with pytest.raises(ConfigError, match="data.val_fraction"):
        Personalized(pfl_cfg("data.val_fraction=0.1"), ds, ds.test_x)
    with pytest.raises(ConfigError, match="new_clients"):
        pfl_cfg("scenario.new_clients=5")


def test_retrogress_is_the_mean_drop_from_the_local_to_the_received_model(pfl_data):
    _, out = run_pfl("fedavg_ft", pfl_data, *FAST)
    rows = [r for r in out.tables["clients"] if not r["new"]]
    per_round = {}
    for r in rows:
        per_round.setdefault(r["round"], []).append(r["val_local"] - r["val_received"])
    assert out.summary["retrogress"] == pytest.approx(np.mean([np.mean(v) for v in per_round.values()]))
    assert any(r["val_local"] != r["val_received"] for r in rows)  # fine-tuned vs. the new global model: they differ


def test_a_client_that_never_takes_the_servers_model_does_not_retrogress(pfl_data):
    _, out = run_pfl("local_only", pfl_data, *FAST)
    assert out.summary["retrogress"] == 0.0
    assert sum(r["bytes_up"] for r in out.tables["rounds"]) == 0  # it sends nothing


@pytest.mark.parametrize("method", ["ditto", "det", "fedavg_ft"])
def test_shared_retrogress_is_the_drop_of_the_model_that_takes_the_servers(method, pfl_data):
    """Ditto and DET keep their personal model, so their retrogress is 0 by construction; the
    model that does take the server's (Ditto's global, DET's deputy) drops, and shared
    retrogress measures that. For a one-model method the two figures are one."""
    _, out = run_pfl(method, pfl_data, *FAST)
    rows = [r for r in out.tables["clients"] if not r["new"] and r["val_arriving"] is not None]
    per_round = {}
    for r in rows:
        per_round.setdefault(r["round"], []).append(r["val_local"] - r["val_arriving"])
    s = out.summary
    assert s["retrogress_shared"] == pytest.approx(np.mean([np.mean(v) for v in per_round.values()]))
    if method == "fedavg_ft":
        assert s["retrogress_shared"] == s["retrogress"] != 0.0
    else:
        assert s["retrogress"] == 0.0 and s["retrogress_shared"] != 0.0


def test_the_summary_reads_the_last_round_and_the_round_chosen_on_validation(pfl_data):
    _, out = run_pfl("fedavg_pfl", pfl_data, "training.rounds=4", "eval.every=1")
    rows = [r for r in out.tables["clients"] if not r["new"]]
    by_round = {}
    for r in rows:
        by_round.setdefault(r["round"], []).append(r)
    val = {k: np.mean([r["val_acc"] for r in v]) for k, v in by_round.items()}
    best = min(k for k in val if val[k] == max(val.values()))
    assert out.summary["val_round"] == best
    assert out.summary["acc_mean"] == pytest.approx(np.mean([r["test_acc"] for r in by_round[3]]))
    assert out.summary["acc_mean_at_val"] == pytest.approx(np.mean([r["test_acc"] for r in by_round[best]]))


def test_a_run_scored_on_validation_has_no_test_figures(pfl_data):
    _, out = run_pfl("fedavg_pfl", pfl_data, *FAST, "eval.split=val")
    assert out.summary["acc_mean"] is None and out.summary["new_acc"] is None and out.summary["val_acc"] > 0
    assert all(r["test_acc"] is None for r in out.tables["clients"])


def test_report_and_plot_read_a_personalised_sweep_with_an_attacker(tmp_path):
    """Through the CLI: the sweep's table shows the track's columns, the report its labels, and
    plot draws the client spread, retrogress, and the attention an attacker got."""
    from typer.testing import CliRunner

    from bench.cli import app

    out = tmp_path / "res"
    sets = [*BASE, "scenario.new_clients=0", "training.rounds=3", "scenario.attack.kind=random"]
    args = ["run", "-c", "smoke", "--methods", "fedavg_ft,fedamp_attention", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    assert "acc_mean" in res.output and "final_acc" not in res.output
    table = CliRunner().invoke(app, ["report", str(out)])
    assert table.exit_code == 0 and "Worst-10% acc. (%)" in table.output and "Retrogress (%)" in table.output, table.output
    figs = CliRunner().invoke(app, ["plot", str(out), "-o", str(tmp_path / "fig")])
    assert figs.exit_code == 0, figs.output
    for name in ("pfl_client_spread", "pfl_retrogress", "pfl_attention_matrix", "pfl_attention_attacker"):
        assert (tmp_path / "fig" / f"{name}.png").exists(), name
    assert not (tmp_path / "fig" / "forgetting.png").exists()


def test_dry_run_prints_the_personalised_scenario_through_the_track_seam(tmp_path):
    """`run --dry-run` on the personalised track prints its one stage: 5 clients hold data, 4
    train and the new one joins at the end; with the track's own description. It trains
    nothing and writes nothing."""
    from typer.testing import CliRunner

    from bench.cli import app
    from tests.personalized.conftest import BASE

    out = tmp_path / "r"
    args = ["run", "-c", "smoke", "--methods", "local_only", "--dry-run", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, *(a for s in BASE for a in ("--set", s))], terminal_width=400)
    assert res.exit_code == 0, res.output
    assert "personalized" in res.output and '"new_clients": 1' in res.output
    row = next(line for line in res.output.splitlines() if line.strip("│ ").startswith("0 "))
    assert [c.strip() for c in row.split("│")[1:5]] == ["0", "5", "4", "1"], row
    assert not out.exists()
