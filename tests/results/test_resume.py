"""Task-level resume (bench/checkpoint.py): a run killed mid-task restarts at its last
completed task and writes the tables an uninterrupted run writes."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pandas as pd
from typer.testing import CliRunner

from bench.checkpoint import CheckpointStore
from bench.cli import app

# columns that measure time (or where a run happened to be interrupted), not results
TIMING = ["wall_seconds", "client_seconds", "gpu_seconds", "latency_s", "start_time", "end_time", "resumed_at_task"]
COMMAND = ["run", "--config", "smoke", "--methods", "fedame", "--set", "training.rounds=12"]


def table(out, name):
    df = pd.read_parquet(out / name)
    return df.drop(columns=[c for c in TIMING if c in df])


def kill_after_task(out, task: int) -> None:
    """Run the CLI in its own process and SIGKILL it once the checkpoint of `task` is written."""
    proc = subprocess.Popen([sys.executable, "-m", "bench", *COMMAND, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for f in (out / "checkpoints").glob("*.pkl"):
                with open(f, "rb") as fh:  # written by an atomic rename: never half a file
                    if pickle.load(fh).next_task == task + 1:
                        os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-2000:]}"


def test_a_killed_run_resumes_at_its_last_task_with_the_same_tables(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    kill_after_task(killed, task=1)
    assert not (killed / "runs").exists()  # not complete: killed in task 2 of 3
    assert len(list((killed / "checkpoints").glob("*.pkl"))) == 1

    res = CliRunner().invoke(app, [*COMMAND, "--out", str(killed)])
    assert res.exit_code == 0, res.output
    assert "resuming at task 2 from" in res.output
    assert not list((killed / "checkpoints").glob("*.pkl"))  # dropped once the tables are written
    assert CliRunner().invoke(app, [*COMMAND, "--out", str(whole)]).exit_code == 0

    for name in ("accuracy", "rounds", "summary", "decisions", "runs"):
        pd.testing.assert_frame_equal(table(killed, name), table(whole, name))
    assert table(killed, "rounds")["task"].tolist() == [t for t in range(3) for _ in range(12)]  # every round once
    assert pd.read_parquet(killed / "runs")["resumed_at_task"].tolist() == [2]
    assert pd.read_parquet(whole / "runs")["resumed_at_task"].isna().all()


def test_a_checkpoint_that_cannot_be_read_is_said_and_the_run_starts_over(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.path("r1").parent.mkdir(parents=True)
    store.path("r1").write_bytes(b"\x80\x05 truncated")
    with caplog.at_level("WARNING"):
        assert store.load("r1") is None
    assert store.unusable == [str(store.path("r1"))]
    assert "starts again from task 0" in caplog.text
    assert store.load("absent") is None and len(store.unusable) == 1  # no checkpoint is not a fault


def test_the_llm_key_is_not_written_into_a_checkpoint(monkeypatch, tmp_path):
    import numpy as np

    from fedame.llm import DecisionMaker, LLMConfig, RuleConfig

    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-secret-for-test")
    dm = DecisionMaker(LLMConfig(), RuleConfig(), ("a", "b"), np.eye(2, dtype=np.float32), tmp_path)
    assert dm.uses_llm
    blob = pickle.dumps(dm)
    assert b"sk-secret-for-test" not in blob
    assert pickle.loads(blob).uses_llm  # read again from the environment on resume
    monkeypatch.delenv("DEEPSEEK_API_KEY")
    assert not pickle.loads(blob).uses_llm
