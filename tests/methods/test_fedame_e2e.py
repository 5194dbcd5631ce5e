"""FedAME through the whole harness: decisions table, experts over time, the LLM path."""

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.metrics import stats_column
from bench.results import read_table
from tests.llm_server import FakeLLM

runner = CliRunner()


def test_tiny_fedame_run_with_rule_decisions(tmp_path):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", "--config", "smoke", "--methods", "fedame", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = read_table(out, "summary").to_pylist()[0]
    R = {(r["after_task"], r["eval_task"]): r["accuracy"] for r in read_table(out, "accuracy").to_pylist()}
    assert R[(0, 0)] > 0.9 and R[(2, 2)] > 0.9  # each task's two classes learnt while it trains (chance 0.5)
    assert s["final_acc"] == pytest.approx(float(np.mean([R[(2, j)] for j in range(3)])), abs=1e-9)  # 20 test images per class
    decisions = read_table(out, "decisions").to_pylist()
    assert sorted(d["class_id"] for d in decisions) == list(range(6))  # one decision per class
    assert {d["source"] for d in decisions} == {"heuristic"}
    experts = stats_column(read_table(out, "rounds").to_pandas(), "experts_alive")
    assert (experts >= 1).all()
    # synthetic superclasses are even/odd labels: the rule keeps one expert per cluster
    assert experts.max() == 2


def test_llm_decisions_flow_into_the_results(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAME_TEST_KEY", "sk-local")
    with FakeLLM() as server:
        server.answer = {"action": "new_expert", "expert": None, "reason": "each class alone"}
        out = tmp_path / "r"
        args = [
            "run",
            "--config",
            "smoke",
            "--methods",
            "fedame",
            "--out",
            str(out),
            "--set",
            f"methods.fedame.llm.base_url={server.base_url}",
            "--set",
            "methods.fedame.llm.api_key_env=FEDAME_TEST_KEY",
            "--set",
            "methods.fedame.llm.max_retries=0",
        ]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert len(server.requests) == 6
    decisions = read_table(out, "decisions").to_pylist()
    assert {d["source"] for d in decisions} == {"llm"} and {d["action"] for d in decisions} == {"new_expert"}
    assert all(d["response_digest"] for d in decisions)
    assert stats_column(read_table(out, "rounds").to_pandas(), "experts_alive").max() == 6


def test_profile_script_replays_a_captured_client_update():
    """scripts/profile_fedame_step.py: the captured update is the one asked for, replayed and
    profiled; a job past the end of the run is one clear line."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "profile_fedame_step.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], capture_output=True, text=True, timeout=300)
    res = run("--job", "8", "--repeats", "1", "--rows", "3", "--", "-c", "smoke")
    assert res.returncode == 0, res.stderr
    # smoke: 3 clients per round, so update 8 is the third round's second client of task 0
    assert re.search(r"client update 8: task 0, round 2, client 1: \d+ samples, \d+ experts held", res.stdout), res.stdout
    assert "aten::" in res.stdout and re.search(r"without the experts' dispatch: \d+ ms \(\d+% of the update\)", res.stdout)
    shares = re.search(r"self time: matrix products (\d+)%, optimiser step (\d+)%, the rest \(.*?\) (\d+)%; (\d+) aten calls", res.stdout)
    assert shares, res.stdout
    products, optimiser, rest, calls = map(int, shares.groups())
    assert products > 0 and rest > 0 and calls > 0  # the update runs products and elementwise passes
    assert 98 <= products + optimiser + rest <= 102  # the three parts cover the profiled self time
    res = run("--job", "100000", "--", "-c", "smoke")
    assert res.returncode != 0 and "choose --job <= " in res.stderr
