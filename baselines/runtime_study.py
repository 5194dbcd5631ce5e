"""Runtime benchmark: local executor vs Ray with 1, 2, 4 ... client actors on one workload
where client compute dominates (FedAvg with a wide MLP head on synthetic features).

Printed per executor: seconds per round, client updates per second, and the orchestration
overhead per round as the issue defines it: wall time minus the client compute on the
critical path (for each worker, the sum of its clients' compute this round; the slowest
worker's sum). Each figure is computed per round, then its median over rounds 2..R is
printed. The overhead is split into the server's own work (payloads, aggregation,
stats, timed from the driver) and the rest (dispatch, transfers, waiting). Bytes moved are
what the rounds table counts. Numbers are measured, never assumed; record them in
docs/results.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import load_dataset
from bench.features import FeatureStore
from bench.loader import load_config
from bench.runner import RunSpec, execute_run
from bench.runtime import Executor, make_executor

SERVER_ROUND_HOOKS = ("payloads_for", "aggregate", "stats", "predict")


class _TimedServer:
    """Proxy that adds the time spent in a server's per-round hooks to a clock."""

    def __init__(self, server: Any, clock: dict[str, float]) -> None:
        self._server, self._clock = server, clock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._server, name)
        if name not in SERVER_ROUND_HOOKS:
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._clock["server"] += time.perf_counter() - t0

        return timed


class Instrumented(Executor):
    """Wraps an executor to record, per round, the critical-path client compute and the
    server's time, without changing what it runs."""

    def __init__(self, inner: Executor) -> None:
        self.inner, self.name = inner, inner.name
        self.clock = {"server": 0.0}
        self.rounds: list[dict[str, float]] = []
        self._critical = 0.0

    def make_server(self, server_cls, config, env):
        return _TimedServer(self.inner.make_server(server_cls, config, env), self.clock)

    def start(self, client_cls, config, env, train_x, train_y) -> None:
        self.inner.start(client_cls, config, env, train_x, train_y)

    def set_task(self, task, indices, noise=None) -> None:
        self.inner.set_task(task, indices, noise)

    def manifests(self, payloads):
        return self.inner.manifests(payloads)

    def label_run(self, labels: dict[str, str]) -> None:
        self.inner.label_run(labels)

    def train(self, jobs):
        t0 = time.perf_counter()
        results = self.inner.train(jobs)
        self.clock["train"] = time.perf_counter() - t0
        worker_of = getattr(self.inner, "actor_of", lambda k: 0)  # the local executor is one worker
        per_worker: dict[int, float] = defaultdict(float)
        for job, res in zip(jobs, results):
            per_worker[worker_of(job.client_id)] += res.seconds
        self._critical = max(per_worker.values(), default=0.0)
        return results

    def round_done(self, method: str, row: dict) -> None:
        self.inner.round_done(method, row)
        self.rounds.append({"critical": self._critical, "server": self.clock["server"], "train": self.clock.get("train", 0.0)})
        self.clock["server"] = 0.0

    def stop(self) -> None:
        self.inner.stop()


class GpuSampler:
    """Mean GPU utilisation (percent, all visible GPUs) while a measurement runs, sampled
    with nvidia-smi every `period` seconds; None where there is no NVIDIA GPU."""

    def __init__(self, period: float = 0.5) -> None:
        self.period, self.samples = period, []
        self.cmd = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            out = subprocess.run(
                [self.cmd, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False
            ).stdout
            values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
            if values:
                self.samples.append(sum(values) / len(values))

    def __enter__(self) -> GpuSampler:
        if self.cmd:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.cmd:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def workload(clients: int, rounds: int, hidden: int, per_class: int, extra: list[str]):
    return load_config(
        "smoke",
        [
            f"data.synthetic.train_per_class={per_class}",
            "data.synthetic.num_classes=10",
            "data.synthetic.test_per_class=20",
            "scenario.tasks=[10]",
            f"scenario.num_clients={clients}",
            "scenario.partition=iid",
            f"training.rounds={rounds}",
            "training.local_epochs=2",
            "training.batch_size=64",
            "eval.every=0",
            "methods.fedavg.head=mlp",
            f"methods.fedavg.hidden={hidden}",
            *extra,
        ],
    )


def measure(cfg, cache_dir) -> dict:
    ds = load_dataset(cfg.data, None)
    store = FeatureStore(ds, cfg.backbone, cache_dir)
    ex = Instrumented(make_executor(cfg.runtime))
    t0 = time.perf_counter()
    with GpuSampler() as gpu:
        out = execute_run(RunSpec("fedavg", cfg), ds, store, ex, str(cache_dir))
    total = time.perf_counter() - t0
    skip = 1  # the first round pays for warm-up (actor start, first touches)
    rows, timing = out.tables["rounds"][skip:], ex.rounds[skip:]
    # per-round figures, then medians over rounds: one round slowed by something else on the
    # machine does not decide the figure
    wall = np.array([r["wall_seconds"] for r in rows])
    critical = np.array([t["critical"] for t in timing])
    server = np.array([t["server"] for t in timing])
    overhead = np.maximum(wall - critical, 0.0)
    n_actors = cfg.runtime.num_actors or cfg.scenario.num_clients
    return {
        "executor": ex.name if ex.name == "local" else f"ray x{getattr(ex.inner, 'n', n_actors)}",
        "s_per_round": float(np.median(wall)),
        "updates_per_s": float(np.median(cfg.scenario.num_clients / wall)),
        "client_compute_s": float(np.median([r["client_seconds"] for r in rows])),
        "critical_s": float(np.median(critical)),
        "overhead_ms": float(1000 * np.median(overhead)),
        "server_ms": float(1000 * np.median(server)),
        "overhead_pct": float(100 * np.median(overhead / critical)),
        "bytes_per_round": np.median([r["bytes_up"] + r["bytes_down"] for r in rows]),
        "run_s": total,
        "gpu_util_pct": gpu.mean,
        "dispatch_ms": float(1000 * np.median(np.maximum(np.array([t["train"] for t in timing]) - critical, 0.0))),
    }


def run_benchmark(actors: list[int], clients: int, rounds: int, hidden: int, per_class: int, gpus: float = 0.0) -> list[dict]:
    """Local, then Ray with each actor count. With `gpus` > 0, n actors share that many GPUs
    (each asks for gpus / n: 1, 2, 4, 8 actors on one GPU) and train on them; the local
    executor then trains on the GPU too."""
    from bench.sweep import default_cache_dir

    base = workload(clients, rounds, hidden, per_class, [])
    cache = default_cache_dir(base)
    results = [measure(base, cache)]
    cpus = os.cpu_count() or 1
    for n in actors:
        cpus_per = 0 if gpus else max(cpus / n, 0.25)
        cfg = workload(
            clients,
            rounds,
            hidden,
            per_class,
            [
                "runtime.executor=ray",
                f"runtime.num_actors={n}",
                f"runtime.cpus_per_client={cpus_per}",
                f"runtime.gpus_per_client={gpus / n}",
            ],
        )
        results.append(measure(cfg, Path(cache)))
    return results


# ------------------------------------------------------------------ small rounds

SMALL = {"clients": 5, "per_client": 2000, "classes": 10, "rounds": 20, "batch_size": 64, "epochs": 1}


def small_workload(extra: list[str]):
    """5 clients x 2,000 samples of 512-d features, a linear FedAvg head, 1 epoch of batch 64
    per round, 20 rounds, no evaluation but the last: rounds where orchestration shows."""
    w = SMALL
    return load_config(
        "smoke",
        [
            f"data.synthetic.train_per_class={w['per_client'] * w['clients'] // w['classes']}",
            f"data.synthetic.num_classes={w['classes']}",
            "data.synthetic.test_per_class=20",
            f"scenario.tasks=[{w['classes']}]",
            f"scenario.num_clients={w['clients']}",
            "scenario.partition=iid",
            f"training.rounds={w['rounds']}",
            f"training.local_epochs={w['epochs']}",
            f"training.batch_size={w['batch_size']}",
            "training.optimizer=sgd",
            "eval.every=0",
            "methods.fedavg.head=linear",
            *extra,
        ],
    )


def plain_loop(cfg, train_x: np.ndarray, train_y: np.ndarray, parts: tuple[np.ndarray, ...]) -> list[float]:
    """The same FedAvg rounds written as one would without a harness: a loop over clients
    training a linear head with torch, then a sample-weighted average. Seconds per round."""
    import torch
    import torch.nn.functional as F

    t = cfg.training
    data = [(torch.from_numpy(np.ascontiguousarray(train_x[ix])), torch.from_numpy(train_y[ix].astype(np.int64))) for ix in parts]
    n_classes = int(train_y.max()) + 1
    model = torch.nn.Linear(train_x.shape[1], n_classes)
    gen = torch.Generator().manual_seed(cfg.seed)
    times = []
    for _ in range(t.rounds):
        t0 = time.perf_counter()
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        states, sizes = [], []
        for x, y in data:
            local = torch.nn.Linear(x.shape[1], n_classes)
            local.load_state_dict(global_state)
            opt = torch.optim.SGD(local.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
            for _ in range(t.local_epochs):
                perm = torch.randperm(len(x), generator=gen)
                for a in range(0, len(x), t.batch_size):
                    idx = perm[a : a + t.batch_size]
                    loss = F.cross_entropy(local(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            states.append(local.state_dict())
            sizes.append(len(x))
        w = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
        model.load_state_dict({k: sum(wi * s[k] for wi, s in zip(w, states)) for k in global_state})
        times.append(time.perf_counter() - t0)
    return times


def run_small_rounds(actors: list[int] | None = None) -> list[dict]:
    """The plain loop, the local executor and the Ray executor (its defaults, then each of
    `actors`) on the small-round workload, one after another in this process."""
    from bench.data import build_scenario
    from bench.sweep import default_cache_dir

    base = small_workload([])
    cache = default_cache_dir(base)
    ds = load_dataset(base.data, None)
    store = FeatureStore(ds, base.backbone, cache)
    train_x = np.asarray(store.features("train"))
    scen = build_scenario(base.scenario, ds.train_y, ds.class_names, base.seed)
    plain = plain_loop(base, train_x, ds.train_y, scen.client_indices[0])[1:]
    rows = [
        {
            "executor": "plain loop",
            "s_per_round": float(np.median(plain)),
            "critical_s": float(np.median(plain)),
            "server_ms": 0.0,
            "dispatch_ms": 0.0,
            "overhead_ms": 0.0,
        }
    ]
    rows.append(measure(base, cache))
    rows.append(measure(small_workload(["runtime.executor=ray"]), cache))
    for n in actors or []:
        rows.append(
            measure(
                small_workload(
                    ["runtime.executor=ray", f"runtime.num_actors={n}", f"runtime.cpus_per_client={max((os.cpu_count() or 1) / n, 0.25)}"]
                ),
                cache,
            )
        )
    for r in rows:
        r["vs_plain"] = r["s_per_round"] / rows[0]["s_per_round"]
    return rows


# ------------------------------------------------------------------ many clients


def tree_pss_bytes(root_pid: int) -> int:
    """Proportional set size of a process and all its descendants (Linux /proc): with Ray,
    the driver, raylet, GCS, dashboard and every actor; shared pages (the object store's
    features) are split among the processes that map them, so the sum counts them once."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def run_scale(clients: list[int], sampled: int, executors: list[str], config: str, extra: list[str], out: Path) -> list[dict]:
    """`fedame-bench run` (FedAvg, IID) with N clients and `sampled` of them per round, under
    each executor, each in its own process; the process tree's peak memory is sampled
    every 0.2 s. Seconds per round: the rounds table's median."""
    import sys

    import pyarrow.parquet as pq

    rows = []
    for ex in executors:
        for n in clients:
            dest = out / f"{ex}-{n}"
            cmd = [
                sys.executable,
                "-m",
                "bench",
                "run",
                "-c",
                config,
                "--methods",
                "fedavg",
                "--out",
                str(dest),
                "--executor",
                ex,
                "--set",
                f"scenario.num_clients={n}",
                "--set",
                f"training.client_fraction={sampled / n}",
                "--set",
                "scenario.partition=iid",
                *[a for e in extra for a in ("--set", e)],
            ]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            peak = 0
            while proc.poll() is None:
                peak = max(peak, tree_pss_bytes(proc.pid))
                time.sleep(0.2)
            err = proc.stderr.read().decode()
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
            rounds = pq.read_table(dest / "rounds").to_pandas()
            rows.append(
                {
                    "executor": ex,
                    "clients": n,
                    "sampled": int(rounds["clients_used"].iloc[0]),
                    "s_per_round": float(rounds["wall_seconds"].median()),
                    "peak_gb": peak / 1e9,
                    "run_s": time.perf_counter() - t0,
                }
            )
    return rows


# ------------------------------------------------------------------ batched clients


def run_batched(counts: list[int], rounds: int = 6) -> list[dict]:
    """The small-round workload's 10,000 samples split IID over N clients, every client
    sampled each round, trained one by one and batched (runtime.batch_clients), local
    executor: seconds per round (median of rounds 2..R) and rounds per second."""
    from bench.sweep import default_cache_dir

    base = small_workload([])  # the data and backbone every count shares: loaded once
    cache = default_cache_dir(base)
    ds = load_dataset(base.data, None)
    store = FeatureStore(ds, base.backbone, cache)
    rows = []
    for n in counts:
        for batched in (False, True):
            cfg = small_workload([f"scenario.num_clients={n}", f"training.rounds={rounds}", f"runtime.batch_clients={batched}"])
            out = execute_run(RunSpec("fedavg", cfg), ds, store, make_executor(cfg.runtime), str(cache))
            wall = float(np.median([r["wall_seconds"] for r in out.tables["rounds"][1:]]))
            rows.append(
                {
                    "clients": n,
                    "path": "batched" if batched else "per client",
                    "s_per_round": wall,
                    "rounds_per_s": 1 / wall,
                    "final_acc": out.summary["final_acc"],
                }
            )
    return rows
