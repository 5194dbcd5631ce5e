"""scripts/gpu_check.py in its CPU mode: the same steps a lent GPU machine runs, end to end,
so the check cannot rot between the days a device is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_mode_runs_every_packing_and_matches_the_cpu_reference(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "FEDAME_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "check.json").read_text())
    assert result["mode"] == "cpu" and result["ok"] and result["device_tests"]["ok"]
    for method in ("fedavg", "fedame", "fedame_plus"):
        ray_runs = [r for r in result["runs"] if r["method"] == method and r["executor"] == "ray"]
        # one logical GPU shared by 1, 2, 4 and 8 actors, each holding one share of it
        assert [(r["gpus_per_client"], r["actors"]) for r in ray_runs] == [(1.0, 1), (0.5, 2), (0.25, 4), (0.125, 8)]
        assert all(all(len(ids) == 1 for ids in r["actor_gpu_ids"]) for r in ray_runs)
        # one torch thread everywhere: Ray gives the CPU reference's numbers exactly
        assert all(r["diff_points"] == 0 for r in ray_runs), [r["diff_points"] for r in ray_runs]
        assert all(r["s_per_round"] > 0 and r["samples_per_s"] > 0 for r in ray_runs)
    fedame_ref = next(r for r in result["runs"] if r["method"] == "fedame_plus" and r["executor"] == "local")
    assert fedame_ref["final_acc"] > 0.5  # the workload learns: the comparison is not between two chance matrices
    assert "| fedame | ray | 0.125 | 8 |" in (out / "summary.md").read_text()
