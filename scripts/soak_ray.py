"""Soak the Ray path: consecutive sweeps of the smoke config under `--executor ray
--concurrent-runs 2`, half of them interrupted by a real SIGINT at a seeded moment and re-run.

Every sweep joins one local Ray cluster this script starts (loopback only), so at the end
Ray's state API can say whether anything was left behind. The script exits 1 unless every
sweep ends with each of its runs exactly once in its tables, every interrupted sweep exited
130 (or had already finished), and no actor is alive and no placement group is held.

    python scripts/soak_ray.py --sweeps 20 --seed 0 --out /tmp/soak

Its figures are recorded in docs/results.md ("Ray soak").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray


def sweep_cmd(address: str, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--config",
        "smoke",
        "--methods",
        "fedncm,fedavg",
        "--seeds",
        "0,1",
        "--executor",
        "ray",
        "--address",
        address,
        "--concurrent-runs",
        "2",
        "--set",
        "training.rounds=6",
        "--set",
        "runtime.num_actors=1",
        "--out",
        str(out),
    ]


def run_ids(out: Path) -> list[str]:
    from bench.results import read_table

    return [r["run_id"] for r in read_table(out, "summary").to_pylist()] if (out / "summary").exists() else []


def rounds_once(out: Path) -> bool:
    """Every (run, task, round) exactly once in the rounds table."""
    from bench.results import read_table

    rows = read_table(out, "rounds").to_pylist()
    keys = [(r["run_id"], r["task"], r["round"]) for r in rows]
    return bool(keys) and len(keys) == len(set(keys))


def leftovers(address: str) -> dict[str, int]:
    """Actors alive and placement groups held on the soak's own cluster (named: another cluster
    on this machine, a test suite's say, would otherwise be the one asked)."""
    from ray.util.state import list_actors, list_placement_groups

    alive = [a for a in list_actors(address=address, limit=10_000) if a.state != "DEAD"]
    held = [p for p in list_placement_groups(address=address, limit=10_000) if p.state != "REMOVED"]
    return {"actors_alive": len(alive), "placement_groups_held": len(held)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("soak"))
    args = ap.parse_args()
    # A shell starts a background job with SIGINT ignored, and the sweeps would inherit that
    # and never see the signal this script sends them: restore Python's handler first.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = np.random.default_rng(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # a cluster of its own (address="local"), even where another runs on this machine; it binds
    # to this machine's address, as `fedame-bench run --executor ray` does
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    records, t0, full_s = [], time.monotonic(), None
    for i in range(args.sweeps):
        out = args.out / f"sweep-{i:02d}"
        rec: dict = {"sweep": i, "interrupted_at_s": None}
        if i % 2 == 1:
            # within the span of the last uninterrupted sweep, so the signal lands in the sweep
            # (start-up, actors starting, mid-run, between runs), not after it has ended
            delay = float(rng.uniform(0.02, 0.95)) * full_s
            proc = subprocess.Popen(sweep_cmd(address, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                rec["interrupted_at_s"] = round(delay, 1)
            rec["first_exit"] = proc.wait(timeout=300)
            rec["runs_before_rerun"] = len(run_ids(out))
        started = time.monotonic()
        final = subprocess.run(sweep_cmd(address, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        if i % 2 == 0:
            full_s = time.monotonic() - started
        ids = run_ids(out)
        rec |= {"exit": final.returncode, "runs": len(ids), "distinct_runs": len(set(ids)), "rounds_once": rounds_once(out)}
        # interrupted: exit 130; or 0 when every run had completed before the signal could stop one
        expected = ((130, 0) if rec.get("runs_before_rerun") == 4 else (130,)) if rec["interrupted_at_s"] else (0,)
        rec["ok"] = (
            final.returncode == 0
            and len(ids) == len(set(ids)) == 4
            and rec["rounds_once"]
            and rec.get("first_exit", expected[0]) in expected
        )
        records.append(rec)
        print(json.dumps(rec), flush=True)
    time.sleep(2)  # let the last driver's actors be reported dead
    left = leftovers(address)
    interrupted = sum(r["interrupted_at_s"] is not None for r in records)
    result = {
        "sweeps": len(records),
        "interrupted": interrupted,
        "all_ok": all(r["ok"] for r in records),
        **left,
        "minutes": round((time.monotonic() - t0) / 60, 1),
    }
    print(json.dumps(result), flush=True)
    ray.shutdown()
    return 0 if result["all_ok"] and not left["actors_alive"] and not left["placement_groups_held"] else 1


if __name__ == "__main__":
    sys.exit(main())
