"""Runtime benchmark: local executor vs Ray with 1, 2, 4 ... client actors on one workload
where client compute dominates (FedAvg with a wide MLP head on synthetic features).

Printed per executor: seconds per round, client updates per second, the orchestration
overhead per round (wall time minus the client compute on the critical path: the sum of
client times for the sequential local executor, the slowest actor's share for Ray) and
bytes moved per round. Numbers are measured, never assumed; record them in docs/results.md.
"""

from __future__ import annotations

import os
import time

import numpy as np

from bench.config import load_config
from bench.data import load_dataset
from bench.features import FeatureStore
from bench.runner import RunSpec, execute_run
from bench.runtime import make_executor


def workload(clients: int, rounds: int, hidden: int, per_class: int, extra: list[str]):
    cfg = load_config(
        "smoke",
        [
            f"data.synthetic.train_per_class={per_class}", "data.synthetic.num_classes=10", "data.synthetic.test_per_class=20",
            "scenario.tasks=[10]", f"scenario.num_clients={clients}", "scenario.partition=iid",
            f"training.rounds={rounds}", "training.local_epochs=2", "training.batch_size=64", "eval.every=0",
            "methods.fedavg.head=mlp", f"methods.fedavg.hidden={hidden}", *extra,
        ],
    )
    return cfg


def measure(cfg, cache_dir) -> dict:
    ds = load_dataset(cfg.data, None)
    store = FeatureStore(ds, cfg.backbone, cache_dir)
    ex = make_executor(cfg.runtime)
    t0 = time.perf_counter()
    out = execute_run(RunSpec("fedavg", cfg), ds, store, ex, str(cache_dir))
    total = time.perf_counter() - t0
    rows = out.tables["rounds"][1:]  # the first round pays for warm-up (actor start, first touches)
    wall = np.mean([r["wall_seconds"] for r in rows])
    n_actors = cfg.runtime.num_actors or cfg.scenario.num_clients
    compute = np.mean([r["client_seconds"] for r in rows])
    critical = compute if ex.name == "local" else compute / min(n_actors, cfg.scenario.num_clients)
    return {
        "executor": ex.name if ex.name == "local" else f"ray x{n_actors}",
        "s_per_round": wall,
        "updates_per_s": cfg.scenario.num_clients / wall,
        "client_compute_s": compute,
        "overhead_ms": 1000 * max(wall - critical, 0.0),
        "overhead_pct": 100 * max(wall - critical, 0.0) / critical if critical else float("nan"),
        "bytes_per_round": np.mean([r["bytes_up"] + r["bytes_down"] for r in rows]),
        "run_s": total,
    }


def run_benchmark(actors: list[int], clients: int, rounds: int, hidden: int, per_class: int, gpus_per_client: float) -> list[dict]:
    from pathlib import Path

    from bench.sweep import default_cache_dir

    base = workload(clients, rounds, hidden, per_class, [])
    cache = default_cache_dir(base)
    results = [measure(base, cache)]
    cpus = os.cpu_count() or 1
    for n in actors:
        cfg = workload(clients, rounds, hidden, per_class, [
            "runtime.executor=ray", f"runtime.num_actors={n}", f"runtime.cpus_per_client={max(cpus / n, 0.25) if not gpus_per_client else 0}",
            f"runtime.gpus_per_client={gpus_per_client}",
        ])
        results.append(measure(cfg, Path(cache)))
    return results
