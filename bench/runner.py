"""The template loop of one run: tasks x rounds of select -> payloads -> train -> aggregate
-> evaluate, and the rows it produces for every Parquet table.

The runner knows the method only through the contract in bench.api; it never names one.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench.api import MethodEnv, TrainContext, TrainSettings, get_method
from bench.checkpoint import RunCheckpoint, RunProgress
from bench.config import ExperimentConfig
from bench.data import Dataset
from bench.data.validation import with_validation
from bench.features import FeatureStore
from bench.federation import RuleAggregator, malicious_clients
from bench.loader import method_config
from bench.runtime import ClientJob, Executor, ServerHandle, executor_kind
from bench.seeds import derive_seed
from bench.sysinfo import git_sha, hardware, versions
from bench.tracks import Track, get_track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """One cell of a sweep: a method on a fully resolved config (alpha and seed set)."""

    method: str
    config: ExperimentConfig
    sweep: str = ""

    @property
    def alpha(self) -> float:
        return self.config.scenario.alpha

    @property
    def seed(self) -> int:
        return self.config.seed

    @functools.cached_property
    def run_id(self) -> str:
        """Stable across executors and machines: a digest of what determines the numbers."""
        ident = {**config_identity(self.config), **runtime_identity(self.method, self.config), **method_identity(self.method, self.config)}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
        split = "-val" if self.config.eval.split == "val" else ""
        return f"{self.method}-{self.config.data.dataset}-a{self.alpha:g}-s{self.seed}{split}-{digest}"


#: Config fields that enter a run's identity only when the run uses them, so that adding a
#: field to the config leaves the ids of all runs that do not use it unchanged.
WHEN_USED: dict[tuple[str, str], Callable[[ExperimentConfig], bool]] = {
    ("data", "image_size"): lambda c: c.data.dataset == "imagefolder",
    ("data", "test_fraction"): lambda c: c.data.dataset == "imagefolder",
    ("data", "domains"): lambda c: c.data.dataset == "imagefolder",
    ("scenario", "classes_per_client"): lambda c: c.scenario.partition == "label_quantity",
    ("scenario", "feature_noise"): lambda c: bool(c.scenario.feature_noise),
    ("scenario", "tasks_by"): lambda c: c.scenario.tasks_by != "classes",
    ("scenario", "domain_order"): lambda c: c.scenario.tasks_by != "classes",
    ("data", "val_fraction"): lambda c: c.data.val_fraction > 0,
    ("eval", "split"): lambda c: c.eval.split != "test",
    ("scenario", "client_val_fraction"): lambda c: c.track == "personalized",
    ("scenario", "new_clients"): lambda c: c.track == "personalized",
    ("scenario", "imbalance"): lambda c: c.track == "personalized",
}


def config_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """The sections that decide a run's numbers (not where it runs, how it is named or where
    its files are); an image folder by its name, not its path; the attack, the aggregation
    rule and the track only when they are not the defaults."""
    ident = cfg.model_dump(mode="json", include={"seed", "data", "scenario", "backbone", "training", "eval"})
    for (section, key), used in WHEN_USED.items():
        if not used(cfg):
            ident[section].pop(key)
    root = ident["data"].pop("root")
    if cfg.data.dataset == "imagefolder":  # the folder is the dataset
        ident["data"]["folder"] = Path(root).name if root else None
    attack = ident["scenario"].pop("attack")
    if cfg.scenario.attack.kind != "none":
        ident["attack"] = attack
    if cfg.aggregation.rule != "mean":
        ident["aggregation"] = cfg.aggregation.model_dump(mode="json")
    if cfg.track != "class_incremental":
        ident["track"] = cfg.track
    return ident


def runtime_identity(method: str, cfg: ExperimentConfig) -> dict[str, Any]:
    """What of the runtime changes the numbers: torch's thread count changes float summation
    order, so with one count everywhere every executor gives the same numbers, and without
    one a Ray run (whose actors use other counts than the local process) is a run of its
    own; batched clients agree with one-by-one training to float rounding, not to the bit."""
    rt, ident = cfg.runtime, {}
    if rt.torch_threads:
        ident["torch_threads"] = rt.torch_threads
    elif executor_kind(rt) != "local":
        ident["executor"] = executor_kind(rt)
    if rt.batch_clients and get_method(method).ClientClass.batched:
        ident["batch_clients"] = True
    return ident


def method_identity(method: str, cfg: ExperimentConfig) -> dict[str, Any]:
    """The method, its resolved hyperparameters, and the facts outside the config it declares
    (`Server.identity`; only when it has any)."""
    mcfg = method_config(cfg, method)
    ident: dict[str, Any] = {"method": method, "method_config": mcfg.model_dump(mode="json")}
    extra = get_method(method).identity(mcfg)
    if extra:
        ident["method_identity"] = extra
    return ident


@dataclass
class RunOutput:
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def train_settings(cfg: ExperimentConfig) -> TrainSettings:
    t = cfg.training
    return TrainSettings(t.local_epochs, t.batch_size, t.optimizer, t.lr, t.momentum, t.weight_decay)


def method_env(cfg: ExperimentConfig, ds: Dataset, feature_dim: int, cache_dir: str) -> MethodEnv:
    return MethodEnv(
        feature_dim=feature_dim,
        num_classes=ds.num_classes,
        class_names=ds.class_names,
        dataset=ds.name,
        run_seed=cfg.seed,
        num_clients=cfg.scenario.num_clients,
        train=train_settings(cfg),
        superclasses=ds.superclasses,
        cache_dir=cache_dir,
        image_size=ds.train_x.shape[1],
        image_mean=cfg.backbone.mean,
        image_std=cfg.backbone.std,
        aggregator=RuleAggregator(cfg.aggregation, derive_seed(cfg.seed, "aggregation")),
    )


def clients_per_round(cfg: ExperimentConfig) -> int:
    return min(cfg.scenario.num_clients, max(1, int(round(cfg.training.client_fraction * cfg.scenario.num_clients))))


def sample_clients(cfg: ExperimentConfig, task: int, rnd: int, pool: list[int] | None = None) -> list[int]:
    """The round's clients: `training.client_fraction` of `pool` (every client by default),
    a seeded choice per (run, task, round)."""
    if pool is None:
        n, m = cfg.scenario.num_clients, clients_per_round(cfg)
        if m >= n:
            return list(range(n))
        rng = np.random.default_rng(derive_seed(cfg.seed, "sample", task, rnd))
        return sorted(int(k) for k in rng.choice(n, size=m, replace=False))
    m = min(len(pool), max(1, int(round(cfg.training.client_fraction * len(pool)))))
    if m >= len(pool):
        return sorted(pool)
    rng = np.random.default_rng(derive_seed(cfg.seed, "sample", task, rnd))
    return sorted(int(k) for k in rng.choice(pool, size=m, replace=False))


class RunLoop:
    """One run's template loop: stages of rounds of select -> payloads -> train -> aggregate
    -> evaluate, each round's row appended to `progress`. What a stage is and how the server
    is evaluated is the run's track's (bench/tracks/)."""

    def __init__(
        self, spec: RunSpec, server: ServerHandle, executor: Executor, track: Track, env: MethodEnv, progress: RunProgress
    ) -> None:
        self.spec, self.cfg, self.server, self.executor = spec, spec.config, server, executor
        self.track, self.env, self.progress = track, env, progress
        self.attack = self.cfg.scenario.attack
        self.malicious = set(malicious_clients(self.attack, self.cfg.scenario.num_clients, self.cfg.seed))

    def begin_stage(self, t: int) -> int:
        """The server and the workers learn stage t; returns its number of rounds."""
        cfg, stage = self.cfg, self.track.stage(t)
        self.server.begin_task(stage.info)
        self.executor.set_task(t, stage.client_indices, stage.noise)
        return self.server.rounds_for_task(cfg.training.rounds, clients_per_round(cfg) == cfg.scenario.num_clients)

    def train_clients(self, clients: list[int], t: int, r: int) -> tuple[list[Any], int]:
        """Each client trains from its payload (what it keeps is kept); the results and the
        bytes sent down."""
        cfg, progress = self.cfg, self.progress
        jobs = [
            ClientJob(
                k,
                payload,
                TrainContext(cfg.seed, t, r, k, self.env.train, kept=progress.kept.get(k)),
                self.attack if k in self.malicious else None,
            )
            for k, payload in zip(clients, self.server.payloads_for(clients))
        ]
        bytes_down = sum(progress.ledger.charge(j.client_id, m) for j, m in zip(jobs, self.executor.manifests([j.payload for j in jobs])))
        results = self.executor.train(jobs)
        for job, res in zip(jobs, results):
            if res.kept is not None:
                progress.kept[job.client_id] = res.kept
        return results, bytes_down

    def play_round(self, t: int, r: int, last: bool) -> dict[str, Any]:
        cfg, server, progress = self.cfg, self.server, self.progress
        t0 = time.perf_counter()
        results, bytes_down = self.train_clients(sample_clients(cfg, t, r, self.track.participants(t)), t, r)
        server.aggregate([res.update for res in results])
        joiners, joined = self.track.joiners(t) if last else [], []
        if joiners:  # they train once from the aggregated model and are not aggregated
            joined, joined_down = self.train_clients(joiners, t, r + 1)
            bytes_down += joined_down
        acc = None
        if last or (cfg.eval.every and (r + 1) % cfg.eval.every == 0):
            acc, details = self.track.evaluate(server, t, progress.kept)
            self.track.observe(progress.record, t, r, acc, details)
            if last:
                self.track.end_stage(progress.record, t, acc, details)
        client_seconds = sum(res.seconds for res in [*results, *joined])
        progress.gpu_seconds += client_seconds * cfg.runtime.gpus_per_client
        stats = server.stats()
        agg = server.aggregation_report()
        shares = {int(k): v for k, v in agg["shares"].items()}
        row = {
            "run_id": self.spec.run_id,
            "method": self.spec.method,
            "task": t,
            "round": r,
            "acc_seen": acc,
            "loss": float(np.mean([res.update.loss for res in results])),
            "wall_seconds": time.perf_counter() - t0,
            "client_seconds": client_seconds,
            "bytes_up": sum(res.update.nbytes for res in results),
            "bytes_down": bytes_down,
            "clients_used": len(results),
            "retries": sum(res.retries for res in results),
            "stats": json.dumps(stats, sort_keys=True) if stats else None,
            "agg_shares": json.dumps(shares, sort_keys=True) if shares else None,
            "malicious_share": sum(v for k, v in shares.items() if k in self.malicious) if self.malicious and shares else None,
            "agg_fallbacks": agg["fallbacks"],
        }
        progress.rounds_rows.append(row)
        self.executor.round_done(self.spec.method, row)
        return row


def execute_run(
    spec: RunSpec,
    ds: Dataset,
    store: FeatureStore,
    executor: Executor,
    cache_dir: str,
    on_round=None,
    on_task_end=None,
    resume: RunCheckpoint | None = None,
    save_checkpoint=None,
) -> RunOutput:
    """Run one spec to the end and return its table rows (the caller writes them).

    `on_round(row)` sees each rounds-table row; `on_task_end(server, task, track, train_x,
    test_x)` sees the server after each stage's last round (diagnostics, local executor).
    `save_checkpoint(RunCheckpoint)` is handed the run's state after every stage but the last;
    `resume` (such a checkpoint) starts the run at its next stage with that state."""
    cfg = spec.config
    started = resume.started if resume else datetime.now(timezone.utc)
    t_start = time.perf_counter() - (resume.elapsed if resume else 0.0)
    method_input = get_method(spec.method).input_for(method_config(cfg, spec.method))
    train_x, test_x = (
        (store.features("train"), store.features("test"))
        if method_input == "features"
        else (store.images("train"), store.images("test"))  # images, or a recommendation dataset's own rows
    )
    track_cls = get_track(cfg.track)
    if not track_cls.own_validation:
        ds, train_x, test_x = with_validation(ds, train_x, test_x, cfg.data.val_fraction, cfg.eval.split, cfg.seed)
    env = method_env(cfg, ds, int(train_x.shape[1]) if method_input == "features" else 0, cache_dir)
    track = track_cls(cfg, ds, test_x)
    track.train_x = train_x
    server = start_run(spec, executor, env, train_x, ds.train_y, resume)
    progress = resume.progress if resume else RunProgress(track.new_record())
    loop = RunLoop(spec, server, executor, track, env, progress)
    try:
        for t in range(resume.next_task if resume else 0, track.num_stages):
            n_rounds = loop.begin_stage(t)
            for r in range(n_rounds):
                row = loop.play_round(t, r, last=r == n_rounds - 1)
                if on_round is not None:
                    on_round(row)
            server.end_task()
            if on_task_end is not None:
                on_task_end(server, t, track, train_x, test_x)
            if save_checkpoint is not None and t < track.num_stages - 1:
                save_checkpoint(
                    RunCheckpoint(spec.run_id, t + 1, server.state(), copy.deepcopy(progress), time.perf_counter() - t_start, started)
                )
        extra = server.extra_rows()  # before stop(): on Ray the server lives in an actor
    finally:
        executor.stop()
    runs_row = run_row(spec, ds.name, executor.name, "completed", None, started)
    runs_row["resumed_at_task"] = resume.next_task if resume else None
    return run_tables(spec, ds.name, track, progress, extra, runs_row, time.perf_counter() - t_start)


def start_run(
    spec: RunSpec, executor: Executor, env: MethodEnv, train_x: np.ndarray, train_y: np.ndarray, resume: RunCheckpoint | None
) -> ServerHandle:
    """The run's server (restored from `resume`) and its client workers, ready for stage 0;
    a failed start releases what it reserved (central actor, placement group)."""
    method_cls, mcfg = get_method(spec.method), method_config(spec.config, spec.method)
    if spec.config.runtime.batch_clients and not method_cls.ClientClass.batched:
        log.warning("%s has no batched client path: runtime.batch_clients is ignored, its clients train one by one", spec.method)
    executor.label_run({"run_id": spec.run_id, "method": spec.method, "alpha": f"{spec.alpha:g}", "seed": str(spec.seed)})
    server = executor.make_server(method_cls, mcfg, env)
    try:
        server.setup()
        if resume:
            server.load_state(resume.server_state)
        executor.start(method_cls.ClientClass, mcfg, env, train_x, train_y)
    except BaseException:
        executor.stop()
        raise
    return server


def run_tables(
    spec: RunSpec,
    dataset: str,
    track: Track,
    progress: RunProgress,
    extra: dict[str, list[dict[str, Any]]],
    runs_row: dict[str, Any],
    wall: float,
) -> RunOutput:
    """A finished run's rows for every table (the harness's, its track's, its method's), and its summary."""
    summary = {
        "run_id": spec.run_id,
        "method": spec.method,
        "dataset": dataset,
        "alpha": spec.alpha,
        "seed": spec.seed,
        "num_tasks": track.num_stages,
        **track.summarize(progress.record),
        "wall_seconds": wall,
        "gpu_seconds": progress.gpu_seconds,
        "bytes_up": int(sum(r["bytes_up"] for r in progress.rounds_rows)),
        "bytes_down": int(sum(r["bytes_down"] for r in progress.rounds_rows)),
        **get_method(spec.method).summarize(extra),
    }
    own = {"run_id": spec.run_id, "method": spec.method}
    tables = {
        "runs": [runs_row],
        "rounds": progress.rounds_rows,
        "summary": [summary],
        **{name: [{**own, **row} for row in rows] for name, rows in track.rows(progress.record).items()},
        **{name: [{"run_id": spec.run_id, **row} for row in rows] for name, rows in extra.items()},
    }
    return RunOutput(tables, summary)


def attack_label(cfg: ExperimentConfig, malicious: tuple[int, ...]) -> str:
    """E.g. "none", "sign_flip x1" (kind and malicious client count)."""
    kind = cfg.scenario.attack.kind
    return "none" if kind == "none" else f"{kind} x{len(malicious)}"


def run_row(spec: RunSpec, dataset: str, executor: str, status: str, error: str | None, started: datetime) -> dict[str, Any]:
    cfg = spec.config
    tasks = cfg.scenario.tasks
    n_tasks = len(tasks) if tasks else (cfg.scenario.n_tasks or 1)
    malicious = malicious_clients(cfg.scenario.attack, cfg.scenario.num_clients, cfg.seed)
    return {
        "run_id": spec.run_id,
        "sweep": spec.sweep,
        "method": spec.method,
        "dataset": dataset,
        "alpha": spec.alpha,
        "seed": spec.seed,
        "num_clients": cfg.scenario.num_clients,
        "tasks": ",".join(map(str, tasks)) if tasks else f"{n_tasks} equal",
        "num_tasks": n_tasks,
        "rounds": cfg.training.rounds,
        "local_epochs": cfg.training.local_epochs,
        "partition": cfg.scenario.partition,
        "eval_split": cfg.eval.split,
        "aggregation": cfg.aggregation.rule,
        "attack": attack_label(cfg, malicious),
        "malicious": json.dumps(list(malicious)),
        "backbone": f"{cfg.backbone.arch}/{cfg.backbone.variant}/{cfg.backbone.weights}",
        "executor": executor,
        "config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        "versions": json.dumps(versions(), sort_keys=True),
        "git_sha": git_sha(),
        "hardware": hardware(),
        "status": status,
        "error": error,
        "start_time": started,
        "end_time": datetime.now(timezone.utc),
    }
