"""The GPU check: one command that proves the multi-GPU claims on a lent device, and runs end
to end on the CPU (``--cpu``) so that CI keeps it from rotting.

    python scripts/gpu_check.py --out gpu-check/          # on a CUDA machine (about 5-8 min)
    python scripts/gpu_check.py --cpu --out gpu-check/    # the same steps on the CPU (CI)

Steps (docs/results.md, "GPU check", says what each proves):

1. ``tests/runtime/test_device.py`` (the CUDA tests) in a subprocess; on the CPU they are skipped.
2. FedAvg and FedAME on the workload (the main job when ``../shared`` is there, else the smoke
   config), each run on the CPU as the reference, then locally on the device, then under Ray
   with ``gpus_per_client`` 1, 0.5, 0.25 and 0.125 on one GPU (1, 2, 4 and 8 client actors).
   Every actor must hold its fraction of one GPU and, on a GPU machine, train on CUDA.
3. Each run's accuracy matrix is compared with the CPU reference (``--tolerance``, points of
   accuracy in any cell); seconds per round, training samples per second, peak GPU memory and
   utilisation are measured per packing.

Everything goes under ``--out``: ``check.json`` (every figure) and ``summary.md`` (the table).
The exit code is 0 only when every check passed. Nothing here needs a network. With ``--cpu``
the cluster gets one *logical* GPU, so the fractions are real Ray resources without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PACKINGS = (1.0, 0.5, 0.25, 0.125)
METHODS = ("fedavg", "fedame", "fedame_plus")


def workload(cpu: bool) -> tuple[str, list[str]]:
    """The main job where its inputs exist (8 clients, so the 8-actor packing has a client
    each), else the smoke config at a CI budget."""
    fixed = ["scenario.num_clients=8", "runtime.torch_threads=1", "runtime.cpus_per_client=0"]
    if (ROOT / "../shared/data/cifar-100-python").exists() and not cpu:
        return "cifar100_local", fixed
    return "smoke", [*fixed, "training.rounds=2", "data.synthetic.train_per_class=60", "scenario.min_samples=2"]


class GpuSampler:
    """nvidia-smi every 0.2 s while a run goes on: the peak memory used and the mean
    utilisation of GPU 0 (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True) if shutil.which("nvidia-smi") else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
            )
            try:
                util, mem = (float(v) for v in out.stdout.strip().split(","))
                self.samples.append((util, mem))
            except ValueError:
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> GpuSampler:
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def figures(self) -> dict:
        if not self.samples:
            return {"gpu_util_pct": None, "gpu_mem_mb": None}
        util, mem = zip(*self.samples)
        return {"gpu_util_pct": float(np.mean(util)), "gpu_mem_mb": float(max(mem))}


def device_tests(out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "tests/runtime/test_device.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    (out / "test_device.log").write_text(proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": proc.returncode, "result": last, "ok": proc.returncode == 0}


class Workload:
    """The data, features and scenario size shared by every run of the check, prepared once
    (``bench.sweep.prepare``: data present, features cached) for all the runs that follow."""

    def __init__(self, config: str, overrides: list[str], methods: list[str]) -> None:
        from bench.data import build_scenario
        from bench.loader import load_config
        from bench.sweep import expand, prepare

        self.config, self.overrides = config, overrides
        cfg = load_config(config, overrides)
        self.prepared = prepare(cfg, expand(cfg, methods, [cfg.scenario.alpha], [cfg.seed]), None)
        ds = self.prepared.dataset
        scenario = build_scenario(cfg.scenario, ds.train_y, ds.class_names, cfg.seed, ds.train_domain, ds.domain_names)
        self.trained = int(scenario.counts(ds.train_y).sum()) * cfg.training.rounds * cfg.training.local_epochs


def one_run(method: str, work: Workload, executor_kind: str, gpus: float, device: str) -> dict:
    """One run of `method`; its accuracy matrix, timings and where its clients trained."""
    import torch

    from bench.loader import load_config
    from bench.runner import RunSpec, execute_run
    from bench.runtime import make_executor

    extra = [f"runtime.device={device}", f"runtime.executor={executor_kind}"]
    if executor_kind == "ray":
        extra += [f"runtime.gpus_per_client={gpus}", f"runtime.num_actors={round(1 / gpus)}"]
    cfg = load_config(work.config, [*work.overrides, *extra])
    executor = make_executor(cfg.runtime)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with GpuSampler() as sampler:
        out = execute_run(RunSpec(method, cfg), work.prepared.dataset, work.prepared.store, executor, str(work.prepared.cache_dir))
    wall = time.perf_counter() - t0
    rounds = out.tables["rounds"]
    actors = getattr(executor, "devices", [])  # the Ray executor's client actors, as they described themselves
    row = {
        "method": method,
        "executor": executor_kind,
        "gpus_per_client": gpus if executor_kind == "ray" else None,
        "device": device,
        "actors": len(actors) or None,
        "actor_devices": sorted({d["device"] for d in actors}) or None,
        "actor_gpu_ids": [d["gpu_ids"] for d in actors] or None,
        "wall_s": wall,
        "s_per_round": float(np.mean([r["wall_seconds"] for r in rounds])),
        "samples_per_s": work.trained / sum(r["wall_seconds"] for r in rounds),
        "final_acc": out.summary["final_acc"],
        "matrix": [[r["after_task"], r["eval_task"], r["accuracy"]] for r in out.tables["accuracy"]],
        **sampler.figures(),
    }
    if executor_kind == "local" and device == "cuda":
        row["gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def packing_ok(row: dict, cuda: bool) -> str | None:
    """Why a Ray run did not get what it asked for (None when it did)."""
    want = round(1 / row["gpus_per_client"])
    if row["actors"] != want:
        return f"{row['actors']} actors, not {want}"
    if any(len(ids) != 1 for ids in row["actor_gpu_ids"]):
        return f"an actor holds no GPU share: {row['actor_gpu_ids']}"
    if cuda and row["actor_devices"] != ["cuda"]:
        return f"actors trained on {row['actor_devices']}, not CUDA"
    return None


def compare(row: dict, ref: dict) -> float:
    """The largest difference from the reference in any cell of the accuracy matrix, in points."""
    a = {(i, j): v for i, j, v in ref["matrix"]}
    return max(abs(v - a[(i, j)]) for i, j, v in row["matrix"]) * 100


def summary_md(result: dict) -> str:
    lines = [
        f"# GPU check ({result['mode']}, {result['workload']})",
        "",
        f"device tests: {result['device_tests']['result']}",
        "",
        "| method | executor | GPU share | actors | trained on | s/round | samples/s | GPU mem MB | GPU util % | final | max cell diff vs CPU (points) | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['method']} | {r['executor']} | {fmt(r['gpus_per_client'], 'g')} | {r['actors'] or '-'} | "
            f"{','.join(r['actor_devices'] or [r['device']])} | {r['s_per_round']:.3f} | {r['samples_per_s']:.0f} | "
            f"{fmt(r['gpu_mem_mb'], '.0f')} | {fmt(r['gpu_util_pct'], '.0f')} | {r['final_acc']:.4f} | "
            f"{fmt(r.get('diff_points'), '.2f')} | {r.get('problem') or 'ok'} |"
        )
    lines += ["", f"tolerance: {result['tolerance']} points in any cell of the accuracy matrix; all checks passed: {result['ok']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run every step on the CPU with one logical GPU (CI)")
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--tolerance", type=float, default=2.0, help="points of accuracy a device's cell may differ from the CPU's")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the configs' relative paths (../shared) resolve against the repository root
    sys.path.insert(0, str(ROOT))
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("error: no CUDA device here; run with --cpu for the CPU mode", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    config, overrides = workload(args.cpu)
    result: dict = {
        "mode": "cuda" if cuda else "cpu",
        "workload": config,
        "overrides": overrides,
        "tolerance": args.tolerance,
        "device_tests": device_tests(args.out),
        "runs": [],
    }
    print(f"device tests: {result['device_tests']['result']}", flush=True)

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_gpus=None if cuda else 1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    device = "cuda" if cuda else "cpu"
    try:
        methods = args.methods.split(",")
        work = Workload(config, overrides, methods)
        for method in methods:
            ref = one_run(method, work, "local", 0, "cpu")
            result["runs"].append(ref)
            runs = ([one_run(method, work, "local", 0, "cuda")] if cuda else []) + [
                one_run(method, work, "ray", g, device) for g in PACKINGS
            ]
            for r in runs:
                r["diff_points"] = compare(r, ref)
                problems = [packing_ok(r, cuda)] if r["executor"] == "ray" else []
                if r["diff_points"] > args.tolerance:
                    problems.append(f"{r['diff_points']:.2f} points from the CPU run")
                r["problem"] = "; ".join(p for p in problems if p) or None
                result["runs"].append(r)
                print(
                    f"{method} {r['executor']} share={r['gpus_per_client']} s/round={r['s_per_round']:.3f} "
                    f"diff={r['diff_points']:.2f} {r['problem'] or 'ok'}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    result["ok"] = result["device_tests"]["ok"] and not any(r.get("problem") for r in result["runs"])
    (args.out / "check.json").write_text(json.dumps(result, indent=2))
    (args.out / "summary.md").write_text(summary_md(result))
    print(summary_md(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
