"""A tiny sweep through the CLI: all four tables, their schema, resume, determinism."""

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.results import read_table, schemas

runner = CliRunner()


def run_cli(*args):
    res = runner.invoke(app, list(args))
    return res


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    res = run_cli("run", "--config", "smoke", "--methods", "fedavg,fedncm", "--alpha", "0.5,1.0", "--seeds", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    return out


def test_four_tables_with_schema(smoke_out):
    for name in ("runs", "rounds", "accuracy", "summary"):
        files = sorted((smoke_out / name).glob("*.parquet"))
        assert len(files) == 4, name  # 2 methods x 2 alphas, one file per run
        for f in files:
            assert pq.read_schema(f).remove_metadata() == schemas()[name], name


def test_table_contents_are_consistent(smoke_out):
    runs = read_table(smoke_out, "runs").to_pylist()
    assert {r["status"] for r in runs} == {"completed"}
    assert {(r["method"], r["alpha"]) for r in runs} == {("fedavg", 0.5), ("fedavg", 1.0), ("fedncm", 0.5), ("fedncm", 1.0)}
    rounds = read_table(smoke_out, "rounds").to_pylist()
    # runs x tasks x rounds (smoke: 3 tasks, 3 rounds); FedNCM only reports statistics, so
    # with every client taking part it needs one round per task
    assert sum(r["method"] == "fedavg" for r in rounds) == 2 * 3 * 3
    assert sum(r["method"] == "fedncm" for r in rounds) == 2 * 3 * 1
    assert all(r["bytes_up"] > 0 and r["clients_used"] == 3 for r in rounds)
    fedavg_down = [r["bytes_down"] for r in rounds if r["method"] == "fedavg"]
    assert all(b > 0 for b in fedavg_down)
    acc = read_table(smoke_out, "accuracy").to_pylist()
    assert len(acc) == 4 * 6  # T(T+1)/2 cells per run
    summary = read_table(smoke_out, "summary").to_pylist()
    for s in summary:
        assert 0 <= s["final_acc"] <= 1 and 0 <= s["avg_acc"] <= 1
        cells = {(a["after_task"], a["eval_task"]): a["accuracy"] for a in acc if a["run_id"] == s["run_id"]}
        # forgetting recomputed from the accuracy table agrees with the summary
        f = sum(max(cells[(i, j)] for i in range(j, 2)) - cells[(2, j)] for j in range(2)) / 2
        assert s["forgetting"] == pytest.approx(f)


def test_resume_does_no_work(smoke_out):
    before = {p: p.stat().st_mtime_ns for p in smoke_out.rglob("*.parquet")}
    res = run_cli("run", "--config", "smoke", "--methods", "fedavg,fedncm", "--alpha", "0.5,1.0", "--seeds", "0", "--out", str(smoke_out))
    assert res.exit_code == 0, res.output
    assert "0 runs completed now" in res.output
    assert {p: p.stat().st_mtime_ns for p in smoke_out.rglob("*.parquet")} == before


def test_interrupted_run_is_redone_without_duplicates(smoke_out, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(smoke_out, out)
    victim = sorted((out / "runs").glob("fedavg-*.parquet"))[0]
    victim.unlink()  # as if the sweep died after writing the other tables of this run
    res = run_cli("run", "--config", "smoke", "--methods", "fedavg,fedncm", "--alpha", "0.5,1.0", "--seeds", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "1 runs completed now" in res.output
    assert read_table(out, "rounds").num_rows == read_table(smoke_out, "rounds").num_rows
    assert read_table(out, "summary").to_pylist() != []
    a = {r["run_id"]: r["final_acc"] for r in read_table(out, "summary").to_pylist()}
    b = {r["run_id"]: r["final_acc"] for r in read_table(smoke_out, "summary").to_pylist()}
    assert a == b  # the redone run reproduces its numbers exactly


def test_dry_run_prints_counts_and_writes_nothing(tmp_path):
    res = run_cli("run", "--config", "smoke", "--dry-run", "--out", str(tmp_path / "r"))
    assert res.exit_code == 0, res.output
    assert "client 2" in res.output and "total" in res.output
    assert not (tmp_path / "r").exists()


def test_methods_lists_registry():
    res = run_cli("methods")
    assert res.exit_code == 0
    for name in ("fedavg", "fedprox", "fedlwf", "fedncm"):
        assert name in res.output


def test_ctrl_c_keeps_completed_runs_and_resumes(tmp_path):
    from bench.loader import load_config
    from bench.results import ResultWriter
    from bench.sweep import expand, prepare, run_sweep

    cfg = load_config("smoke")
    specs = expand(cfg, ["fedncm", "fedavg"], [0.5], [0])
    prepared = prepare(cfg, specs, None)
    writer = ResultWriter(tmp_path / "out")

    def interrupt(spec, row):
        if spec.method == "fedavg" and row["task"] == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run

    with pytest.raises(KeyboardInterrupt):
        run_sweep(specs, prepared, writer, on_round=interrupt)
    assert writer.is_complete(specs[0].run_id) and not writer.is_complete(specs[1].run_id)
    done = run_sweep(specs, prepared, writer)  # the rerun does only what is missing
    assert [s["method"] for s in done] == ["fedavg"]
    assert read_table(tmp_path / "out", "summary").num_rows == 2


def test_every_stats_value_reaches_the_rounds_table(tmp_path):
    """Server.stats() is stored generically (JSON), so a method's own figures are kept."""
    import json

    out = tmp_path / "r"
    res = run_cli("run", "--config", "smoke", "--methods", "moe_adapter,fedavg", "--out", str(out))
    assert res.exit_code == 0, res.output
    rounds = read_table(out, "rounds").to_pylist()
    moe = [json.loads(r["stats"]) for r in rounds if r["method"] == "moe_adapter"]
    assert moe and all(s["trainable_params"] > 0 for s in moe)  # computed, no longer thrown away
    assert all(r["stats"] is None for r in rounds if r["method"] == "fedavg")  # nothing to report


def test_results_written_before_the_stats_column_still_load(tmp_path):
    import pyarrow as pa

    old = schemas()["rounds"].remove(schemas()["rounds"].get_field_index("stats")).append(pa.field("experts_alive", pa.int64()))
    row = {f.name: None for f in old} | {"run_id": "x", "method": "fedavg", "task": 0, "round": 0}
    (tmp_path / "rounds").mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=old), tmp_path / "rounds" / "x.parquet")
    table = read_table(tmp_path, "rounds")
    assert table.schema == schemas()["rounds"] and table.column("stats").to_pylist() == [None]


def test_skips_say_where_and_the_executor_is_part_of_the_run_id(smoke_out):
    from bench.loader import load_config
    from bench.sweep import expand

    res = run_cli("run", "--config", "smoke", "--methods", "fedavg", "--alpha", "0.5", "--seeds", "0", "--out", str(smoke_out))
    assert res.exit_code == 0 and f"fedavg a=0.5 s=0: already complete in {smoke_out}/" in res.output.replace("\n", "")
    local = expand(load_config("smoke"), ["fedavg"], [0.5], [0])[0].run_id
    ray = expand(load_config("smoke", ["runtime.executor=ray"]), ["fedavg"], [0.5], [0])[0].run_id
    assert local != ray  # a Ray run into a directory of local results is run, not skipped
    pinned = [
        expand(load_config("smoke", [f"runtime.executor={e}", "runtime.torch_threads=1"]), ["fedavg"], [0.5], [0])[0].run_id
        for e in ("local", "ray")
    ]
    assert pinned[0] == pinned[1] != local  # one thread count: the executors agree, so one run


def test_every_method_runs_on_an_image_folder(tmp_path):
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "folder", "split", classes=6, train=16, test=6, size=32)
    out = tmp_path / "r"
    res = run_cli(
        "run", "--config", "smoke", "--methods", "all", "--set", "data.dataset=imagefolder", "--set", f"data.root={root}", "--out", str(out)
    )
    assert res.exit_code == 0, res.output
    summary = read_table(out, "summary").to_pandas()
    from bench.api import available_methods

    assert set(summary["method"]) == {m for m, cls in available_methods().items() if "class_incremental" in cls.tracks}
    assert summary.set_index("method").loc["fedncm", "final_acc"] > 0.5  # the classes are learnable: 1/6 is chance
    runs = read_table(out, "runs").to_pandas()
    assert (runs["dataset"] == "imagefolder-folder").all() and (runs["status"] == "completed").all()


def test_label_quantity_and_feature_noise_scenarios_run_end_to_end(tmp_path):
    out = tmp_path / "r"
    res = run_cli(
        "run",
        "--config",
        "smoke",
        "--methods",
        "fedavg,fedncm",
        "--set",
        "scenario.partition=label_quantity",
        "--set",
        "scenario.classes_per_client=1",
        "--set",
        "scenario.feature_noise=0.5",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    runs = read_table(out, "runs").to_pandas()
    assert (runs["partition"] == "label_quantity").all()
    clean = tmp_path / "c"
    assert (
        run_cli(
            "run",
            "--config",
            "smoke",
            "--methods",
            "fedavg",
            "--set",
            "scenario.partition=label_quantity",
            "--set",
            "scenario.classes_per_client=1",
            "--out",
            str(clean),
        ).exit_code
        == 0
    )

    def losses(folder):
        r = read_table(folder, "rounds").to_pandas()
        return r[r["method"] == "fedavg"].sort_values(["task", "round"])["loss"].to_numpy()

    assert len(losses(out)) == len(losses(clean)) and (losses(out) != losses(clean)).all()  # the noise reached the clients


def test_a_domain_incremental_scenario_runs_end_to_end(tmp_path):
    from tests.conftest import write_domain_folders

    root = write_domain_folders(tmp_path / "domains", domains=3, classes=4)
    out = tmp_path / "r"
    res = run_cli(
        "run",
        "--config",
        "smoke",
        "--methods",
        "fedavg,fedncm,fedame_plus",
        "--set",
        "data.dataset=imagefolder",
        "--set",
        f"data.root={root}",
        "--set",
        "data.domains=true",
        "--set",
        "scenario.tasks_by=domain",
        "--set",
        "scenario.tasks=null",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    acc = read_table(out, "accuracy").to_pandas()
    ncm = acc[acc["method"] == "fedncm"].set_index(["after_task", "eval_task"])["accuracy"]
    assert len(ncm) == 6  # three tasks (domains), each evaluated on its own domain's test images
    assert all(ncm.loc[(t, t)] > 0.9 for t in range(3))  # each domain learnable (4 classes: chance is 0.25)
    # FedAME's feature prompts learn every domain too: a class that comes back merges its new
    # data into its prompt (it stayed at chance on domains 1 and 2 when the prompt kept the first
    # domain only)
    ame = acc[acc["method"] == "fedame_plus"].set_index(["after_task", "eval_task"])["accuracy"]
    assert all(ame.loc[(2, t)] > 0.9 for t in range(3)), ame
    bad = run_cli("run", "--config", "smoke", "--set", "scenario.tasks_by=domain", "--out", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "set scenario.tasks and n_tasks to null" in bad.output


def test_a_diverging_run_fails_with_one_line_and_the_sweep_goes_on(tmp_path):
    """At an absurd learning rate FedAvg's loss becomes NaN in its first round: the run is
    recorded as failed with the reason and what to do (a rerun tries it again), and the
    statistics method beside it, which takes no SGD step, still completes."""
    out = tmp_path / "out"
    res = run_cli("run", "--config", "smoke", "--methods", "fedavg,fedncm", "--set", "training.lr=1e38", "--out", str(out))
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "failed: Diverged: training diverged: client" in said and "in task 0, round 0; lower training.lr" in said
    runs = {r["method"]: r for r in read_table(out, "runs").to_pylist()}
    assert runs["fedavg"]["status"] == "failed" and "training diverged" in runs["fedavg"]["error"]
    assert runs["fedncm"]["status"] == "completed"
    assert [r["method"] for r in read_table(out, "summary").to_pylist()] == ["fedncm"]
