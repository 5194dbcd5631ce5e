"""`fedame-bench tune` on the session's Ray cluster: every method gets the same budget, trials
are ordinary harness runs on the validation split, and the chosen config is the best trial's."""

import json

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from bench.cli import app
from bench.results import read_table

runner = CliRunner()


def _space(tmp_path):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "fedavg.yaml").write_text("training.lr: {loguniform: [0.001, 0.5]}\n")
    (spaces / "fedprox.yaml").write_text("methods.fedprox.mu: {choice: [0.0, 0.1, 1.0]}\n")
    return spaces


def _tune(tmp, address, methods, trials, scheduler):
    """`fedame-bench tune` on the smoke config with `_space`'s spaces; its output folder."""
    out = tmp / scheduler
    args = ["tune", "-c", "smoke", "-m", methods, "--trials", str(trials), "--scheduler", scheduler, "--spaces", str(_space(tmp))]
    res = runner.invoke(app, [*args, "--out", str(out), "--address", address])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, cluster):
    return _tune(tmp_path_factory.mktemp("tune"), cluster.address, "fedavg,fedprox", 3, "fifo")


def test_every_method_gets_the_same_budget_and_one_chosen_trial(tuned):
    out = tuned
    for method in ("fedavg", "fedprox"):
        rows = pq.read_table(out / "trials" / f"{method}.parquet").to_pylist()
        assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
        (best,) = [r for r in rows if r["chosen"]]
        assert best["val_final_acc"] == max(r["val_final_acc"] for r in rows)
        assert all(r["val_metric"] == "final_acc" and r["val_score"] == r["val_final_acc"] for r in rows)  # the track's choice
        assert all(r["run_id"].split("-")[-2] == "val" for r in rows)  # scored on validation
    lrs = [json.loads(r["params"])["training.lr"] for r in pq.read_table(out / "trials" / "fedavg.parquet").to_pylist()]
    assert len(set(lrs)) == 3 and all(0.001 <= v <= 0.5 for v in lrs)  # drawn from the space
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())
    assert set(chosen["methods"]) == {"fedavg", "fedprox"} and chosen["methods"]["fedavg"]["trials"] == 3
    assert "tune -c smoke" in chosen["methods"]["fedprox"]["chosen_by"] and chosen["methods"]["fedprox"]["val_fraction"] == 0.1


def test_trials_are_ordinary_runs_a_plain_run_reproduces(tuned, tmp_path):
    """The chosen trial's run, repeated by `fedame-bench run` with its overrides on the
    validation split, gives the same number: the trial is the harness's run, nothing else."""
    out = tuned
    runs = read_table(out / "runs", "runs").to_pylist()
    trials = [r for m in ("fedavg", "fedprox") for r in pq.read_table(out / "trials" / f"{m}.parquet").to_pylist()]
    assert {r["eval_split"] for r in runs} == {"val"}
    assert {r["run_id"] for r in runs} == {t["run_id"] for t in trials}  # every trial's tables (two draws of one choice: one run)
    best = next(r for r in pq.read_table(out / "trials" / "fedavg.parquet").to_pylist() if r["chosen"])
    sets = [f"{k}={v}" for k, v in json.loads(best["params"]).items()]
    sets += ["eval.split=val", "data.val_fraction=0.1", "runtime.executor=local", "runtime.torch_threads=1"]
    again = tmp_path / "again"
    res = runner.invoke(app, ["run", "-c", "smoke", "-m", "fedavg", "--out", str(again), *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    (row,) = read_table(again, "summary").to_pylist()
    assert row["run_id"] == best["run_id"] and row["final_acc"] == pytest.approx(best["val_final_acc"], abs=1e-12)


def test_a_bad_search_space_is_one_line_before_any_trial(tmp_path):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "fedavg.yaml").write_text("training.lr: {normal: [0, 1]}\n")
    res = runner.invoke(app, ["tune", "-c", "smoke", "-m", "fedavg", "--spaces", str(spaces), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "training.lr must be one of" in res.output
    res = runner.invoke(app, ["tune", "-c", "smoke", "-m", "fedncm", "--spaces", str(spaces), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no search space" in res.output


def test_run_tuned_gives_each_method_its_own_choice_on_the_same_training_samples(tuned, tmp_path):
    out = tuned
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())["methods"]
    res = runner.invoke(
        app, ["run", "-c", "smoke", "-m", "fedavg,fedprox", "--tuned", str(out / "chosen.yaml"), "--out", str(tmp_path / "t")]
    )
    assert res.exit_code == 0, res.output
    runs = {r["method"]: r for r in read_table(tmp_path / "t", "runs").to_pylist()}
    cfg = {m: json.loads(r["config"]) for m, r in runs.items()}
    assert cfg["fedavg"]["training"]["lr"] == chosen["fedavg"]["set"]["training.lr"]
    assert cfg["fedprox"]["training"]["lr"] == 0.05  # the smoke config's: fedavg's choice is not fedprox's
    assert cfg["fedprox"]["methods"]["fedprox"]["mu"] == chosen["fedprox"]["set"]["methods.fedprox.mu"]
    assert {r["eval_split"] for r in runs.values()} == {"test"}
    assert {c["data"]["val_fraction"] for c in cfg.values()} == {0.1}  # trained without the slice, as its trials were
    res = runner.invoke(app, ["run", "-c", "smoke", "-m", "fedncm", "--tuned", str(out / "chosen.yaml"), "--out", str(tmp_path / "n")])
    assert res.exit_code == 2 and "no choice for fedncm" in res.output


def test_run_tuned_lets_the_command_line_replace_a_choice_and_says_so(tuned, tmp_path):
    chosen = yaml.safe_load((tuned / "chosen.yaml").read_text())["methods"]["fedprox"]["set"]
    args = ["run", "-c", "smoke", "-m", "fedprox", "--tuned", str(tuned / "chosen.yaml"), "--set", "methods.fedprox.mu=0", "--dry-run"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    line = " ".join(res.output.split())
    assert f"fedprox: --set methods.fedprox.mu=0 replaces the tuned methods.fedprox.mu={chosen['methods.fedprox.mu']}" in line
    res = runner.invoke(app, [*args[:-1], "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    cfg = json.loads(read_table(tmp_path / "a", "runs").to_pylist()[0]["config"])
    assert cfg["methods"]["fedprox"]["mu"] == 0 and cfg["data"]["val_fraction"] == 0.1  # the rest of the tuned file applies


def test_asha_stops_trials_early_and_chooses_among_finished_ones(tmp_path, cluster, tuned):
    out = _tune(tmp_path, cluster.address, "fedavg", 4, "asha")
    rows = pq.read_table(out / "trials" / "fedavg.parquet").to_pylist()
    first = [json.loads(r["params"])["training.lr"] for r in pq.read_table(tuned / "trials" / "fedavg.parquet").to_pylist()]
    assert [json.loads(r["params"])["training.lr"] for r in rows][:3] == first  # the searcher's draws are seeded by the run seed
    finished = [r for r in rows if r["status"] == "completed"]
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert len(finished) + len(stopped) == 4 and finished
    assert all(r["val_final_acc"] is None for r in stopped)
    assert {f["evaluations"] for f in finished} == {9}  # smoke: 3 tasks x 3 rounds, each evaluated
    assert all(r["evaluations"] < 9 for r in stopped)
    assert next(r for r in rows if r["chosen"]) in finished


def test_a_method_with_nothing_to_tune_runs_tuned_with_its_defaults(tmp_path):
    from bench.tune import TuneError, tuned_overrides

    chosen = tmp_path / "chosen.yaml"
    chosen.write_text(yaml.safe_dump({"methods": {"sasrec": {"set": {"training.lr": 0.01}, "val_fraction": 0.0}}}))
    assert tuned_overrides(chosen, "popularity") == []  # no search space: nothing was to be chosen
    assert tuned_overrides(chosen, "sasrec") == ["training.lr=0.01", "data.val_fraction=0.0"]
    with pytest.raises(TuneError, match="no choice for fedavg_sasrec"):
        tuned_overrides(chosen, "fedavg_sasrec")  # it has a space: it must have been tuned
