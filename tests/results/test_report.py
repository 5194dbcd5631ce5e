"""Paper tables and figures from Parquet alone: known means, stds and bold choices."""

import json
import re
from datetime import datetime, timezone

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.results import ResultWriter

runner = CliRunner()


def write_run(writer, run_id, method, alpha, seed, final, forgetting, status="completed"):
    now = datetime.now(timezone.utc)
    runs = [
        {
            "run_id": run_id,
            "method": method,
            "dataset": "cifar100",
            "alpha": alpha,
            "seed": seed,
            "num_tasks": 2,
            "num_clients": 5,
            "partition": "dirichlet",
            "rounds": 3,
            "local_epochs": 1,
            "backbone": "b",
            "status": status,
            "start_time": now,
            "end_time": now,
        }
    ]
    tables = {"runs": runs}
    if status == "completed":
        tables["summary"] = [
            {
                "run_id": run_id,
                "method": method,
                "dataset": "cifar100",
                "alpha": alpha,
                "seed": seed,
                "num_tasks": 2,
                "final_acc": final,
                "avg_acc": final + 0.1,
                "forgetting": forgetting,
                "bwt": -forgetting,
                "wall_seconds": 1.0,
                "gpu_seconds": 0.0,
                "bytes_up": 1,
                "bytes_down": 1,
            }
        ]
        tables["rounds"] = [
            {
                "run_id": run_id,
                "method": method,
                "task": t,
                "round": r,
                "acc_seen": final + 0.1 * (1 - t),
                "loss": 1.0,
                "wall_seconds": 0.1,
                "client_seconds": 0.1,
                "bytes_up": 1,
                "bytes_down": 1,
                "clients_used": 5,
                "retries": 0,
                "stats": json.dumps({"experts_alive": 2 + t}) if method == "fedame" else None,
            }
            for t in range(2)
            for r in range(3)
        ]
        tables["accuracy"] = []
        if method == "fedame":
            tables["decisions"] = [
                {
                    "run_id": run_id,
                    "task": 0,
                    "class_id": 0,
                    "class_name": "apple",
                    "action": "new_expert",
                    "expert": 0,
                    "source": "heuristic",
                    "latency_s": 0.0,
                    "response_digest": None,
                    "reason": "x",
                }
            ]
    writer.write_run(run_id, tables)


@pytest.fixture
def handmade(tmp_path):
    w = ResultWriter(tmp_path / "res")
    # fedame alpha 0.5: final 0.50, 0.60 -> mean 55.0, std 7.1 ; fedavg alpha 0.5: 0.20, 0.30 -> 25.0 ± 7.1
    write_run(w, "a1", "fedame", 0.5, 0, 0.50, 0.10)
    write_run(w, "a2", "fedame", 0.5, 1, 0.60, 0.20)
    write_run(w, "b1", "fedavg", 0.5, 0, 0.20, 0.60)
    write_run(w, "b2", "fedavg", 0.5, 1, 0.30, 0.70)
    # alpha 0.1: fedavg better on final acc; fedame's second seed failed -> incomplete cell
    write_run(w, "c1", "fedame", 0.1, 0, 0.10, 0.30)
    write_run(w, "c2", "fedame", 0.1, 1, 0.0, 0.0, status="failed")
    write_run(w, "d1", "fedavg", 0.1, 0, 0.40, 0.50)
    return tmp_path / "res"


def test_markdown_table_means_stds_and_bold(handmade):
    res = runner.invoke(app, ["report", str(handmade), "--format", "markdown", "--metrics", "final_acc,forgetting"])
    assert res.exit_code == 0, res.output
    lines = {line.split("|")[1].strip(): line for line in res.output.splitlines() if line.startswith("| fed")}
    header = [h.strip() for h in res.output.splitlines()[0].split("|")[2:-1]]
    assert header == ["Final acc. (%) alpha=0.1", "Final acc. (%) alpha=0.5", "Forgetting (%) alpha=0.1", "Forgetting (%) alpha=0.5"]
    fedame = [c.strip() for c in lines["fedame"].split("|")[2:-1]]
    fedavg = [c.strip() for c in lines["fedavg"].split("|")[2:-1]]
    assert fedame[1] == "**55.0 ± 7.1 (2)**" and fedavg[1] == "25.0 ± 7.1 (2)"
    assert fedavg[0] == "**40.0 ± 0.0 (1)** †" and fedame[0] == "10.0 ± 0.0 (1) †"  # incomplete: a failed seed
    assert fedame[3] == "**15.0 ± 7.1 (2)**"  # lower forgetting is best
    assert "Chaudhry" in res.output and "† incomplete" in res.output


def test_latex_is_booktabs_and_balanced(handmade):
    res = runner.invoke(app, ["report", str(handmade), "--format", "latex"])
    assert res.exit_code == 0, res.output
    tex = res.output
    for env in ("table", "tabular"):
        assert tex.count(r"\begin{" + env) == tex.count(r"\end{" + env) == 1
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"\textbf{" in tex
    assert tex.count("{") == tex.count("}")
    assert all(line.count("&") == 6 for line in tex.splitlines() if line.endswith(r"\\"))


def test_csv_and_bad_arguments(handmade, tmp_path):
    res = runner.invoke(app, ["report", str(handmade), "--format", "csv"])
    assert res.exit_code == 0 and res.output.splitlines()[0] == "method,alpha,metric,mean,std,n,complete"
    assert runner.invoke(app, ["report", str(tmp_path / "nope")]).exit_code == 2
    assert runner.invoke(app, ["report", str(handmade), "--metrics", "accuracy"]).exit_code == 2


def test_report_on_a_real_tiny_run(tmp_path):
    out = tmp_path / "r"
    assert runner.invoke(app, ["run", "--config", "smoke", "--methods", "fedavg,fedncm", "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and re.search(r"\| fedncm \| \*\*\d+\.\d ± 0\.0 \(1\)\*\*", res.output), res.output


def test_plots_are_written_with_one_panel_per_alpha(handmade, tmp_path):
    from PIL import Image

    out = tmp_path / "fig"
    res = runner.invoke(app, ["plot", str(handmade), "-o", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("accuracy_per_task", "accuracy_per_round", "forgetting", "fedame_experts"):
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.stat().st_size > 5000 and pdf.stat().st_size > 1000
    w, h = Image.open(out / "accuracy_per_task.png").size
    assert (w, h) == (int(4.2 * 2 * 150), int(3.4 * 150))  # two alphas -> two panels


@pytest.mark.parametrize("command", ["report", "plot"])
def test_a_truncated_parquet_file_is_one_error_line_or_skipped(handmade, tmp_path, command):
    victim = handmade / "summary" / "a1.parquet"
    victim.write_bytes(victim.read_bytes()[:40])  # a half-written file, as a crash or copy leaves
    extra = ["-o", str(tmp_path / "figs")] if command == "plot" else []
    res = runner.invoke(app, [command, str(handmade), *extra])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "a1.parquet" in lines[0] and "--skip-bad" in lines[0]
    res = runner.invoke(app, [command, str(handmade), "--skip-bad", *extra])
    assert res.exit_code == 0, res.output
    assert "warning: skipped" in res.output and "a1.parquet" in res.output
    if command == "report":  # the other runs are still reported: fedame's mean now comes from a2 alone
        assert "fedavg" in res.output and "fedame" in res.output


def test_report_and_plot_refuse_to_average_different_sweeps_as_seeds(tmp_path):
    out = tmp_path / "r"
    # the README's smoke check and a second setting written to one directory
    assert runner.invoke(app, ["run", "--config", "smoke", "--methods", "fedncm", "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["run", "--config", "smoke", "--methods", "fedncm", "--out", str(out), "--set", "scenario.num_clients=2"])
    assert res.exit_code == 0, res.output
    for command in (["report", str(out)], ["plot", str(out), "-o", str(tmp_path / "f")]):
        res = runner.invoke(app, command)
        assert res.exit_code == 2
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "scenario.num_clients" in errors[0] and "--by alpha,num_clients" in errors[0], res.output
    res = runner.invoke(app, ["report", str(out), "--by", "alpha,num_clients"])
    assert res.exit_code == 0 and res.output.count("(1)") == 6, res.output  # 3 metrics x 2 settings, one run each
    # seeds of one setting still average
    assert runner.invoke(app, ["run", "--config", "smoke", "--methods", "fedncm", "--seeds", "1", "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["report", str(out), "--by", "alpha,num_clients"])
    assert res.exit_code == 0 and "(2)" in res.output
