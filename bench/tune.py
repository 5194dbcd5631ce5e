"""`fedame-bench tune`: hyperparameters chosen on the validation split with Ray Tune, the same
trial budget for every method.

Why: a paper table is fair only if every row had the same chance to be tuned, and only if
nothing was chosen on the data it reports. A trial is an ordinary harness run (the same
runner, executors and results) of one method on the config with the trial's `--set`
overrides, scored on the held-out slice of the training data (`data.val_fraction`,
`eval.split: val`, or the dataset's own validation split where its track has one); it
reports the track's headline (`acc_seen`) after each evaluation and is chosen by the track's
`tune_metric` (class-incremental: final accuracy), so
ASHA can stop a poor trial at a task boundary. Every trial's tables land in `OUT/runs/`,
one row per trial in the `trials` table (`OUT/trials/<method>.parquet`), and the best
trial's overrides per method in `OUT/chosen.yaml`.

A search space is a YAML mapping of config keys (what `--set` takes) to one of
`{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}`
(configs/spaces/ holds one per method).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from bench.config import CONFIG_DIR, ConfigError, RuntimeConfig, parse_override
from bench.errors import UserError
from bench.inputs import atomic_write

KINDS = ("choice", "uniform", "loguniform", "randint")
TRIALS = pa.schema(
    [
        ("method", pa.string()),
        ("trial", pa.int64()),
        ("params", pa.string()),  # JSON: the trial's overrides
        ("run_id", pa.string()),
        ("val_metric", pa.string()),  # the summary column trials are chosen by (the track's Track.tune_metric)
        ("val_score", pa.float64()),  # its value on validation
        ("val_final_acc", pa.float64()),  # class-incremental runs: also their final and average accuracy
        ("val_avg_acc", pa.float64()),
        ("evaluations", pa.int64()),  # evaluations the trial reported (fewer than the run has when ASHA stopped it)
        ("status", pa.string()),  # completed | stopped (by the scheduler) | failed
        ("wall_seconds", pa.float64()),
        ("chosen", pa.bool_()),
    ]
)


class TuneError(UserError):
    pass


def read_space(path: Path) -> dict[str, dict[str, list]]:
    """A search space file, checked: each key a config path, each value one known kind."""
    if not path.exists():
        raise TuneError(f"no search space {path}; configs/spaces/ holds one per method")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise TuneError(f"{path}: a search space is a mapping of config keys to {{kind: values}}")
    for key, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise TuneError(f"{path}: {key} must be one of {', '.join(f'{{{k}: ...}}' for k in KINDS)}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
            raise TuneError(f"{path}: {key}: {kind} takes {'a non-empty list' if kind == 'choice' else '[low, high]'}")
    return raw


def tune_domain(spec: dict[str, list]) -> Any:
    from ray import tune

    kind, v = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(v)
    if kind == "uniform":
        return tune.uniform(float(v[0]), float(v[1]))
    if kind == "loguniform":
        return tune.loguniform(float(v[0]), float(v[1]))
    return tune.randint(int(v[0]), int(v[1]) + 1)


@dataclass(frozen=True)
class TuneJob:
    """What every trial of one method shares."""

    config: str
    method: str
    overrides: tuple[str, ...]  # the user's --set, then the validation protocol's
    data_dir: str | None
    out: str
    seed: int
    alpha: float
    cwd: str = field(default_factory=os.getcwd)  # relative paths in the config resolve here, as in `run`


def validation_overrides(config: str, user: list[str]) -> list[str]:
    """The user's overrides plus the validation protocol: scored on `val`, with a slice of 0.1
    unless the config or the user holds one out already."""
    from bench.loader import load_config
    from bench.tracks import get_track

    cfg = load_config(config, user)
    extra = ["eval.split=val", "runtime.executor=local"]
    if cfg.data.val_fraction == 0 and not get_track(cfg.track).own_validation:
        extra.append("data.val_fraction=0.1")
    return [*user, *extra]


def run_trial(params: dict[str, Any], job: TuneJob) -> None:
    """One trial: an ordinary harness run with the trial's overrides, scored on validation;
    reports after every evaluation (ASHA's rungs) and the run's summary at the end."""
    from ray import tune

    from bench.loader import load_config
    from bench.results import ResultWriter
    from bench.runner import execute_run
    from bench.runtime import make_executor
    from bench.sweep import expand, prepare
    from bench.tracks import get_track

    os.chdir(job.cwd)  # Tune starts a trial in its own folder
    overrides = [*job.overrides, *(f"{k}={v}" for k, v in params.items())]
    cfg = load_config(job.config, overrides)
    (spec,) = expand(cfg, [job.method], [job.alpha], [job.seed])
    prepared = prepare(cfg, [spec], job.data_dir)

    def on_round(row: dict) -> None:
        if row["acc_seen"] is not None:
            tune.report({"acc_seen": row["acc_seen"], "run_id": spec.run_id, "run_done": False})

    out = execute_run(spec, prepared.dataset, prepared.store, make_executor(cfg.runtime), str(prepared.cache_dir), on_round=on_round)
    ResultWriter(Path(job.out) / "runs").write_run(spec.run_id, out.tables)
    s, metric = out.summary, get_track(cfg.track).tune_metric
    tune.report(
        {"acc_seen": s[metric], "run_id": spec.run_id, "run_done": True, "val_metric": metric, "val_score": s[metric],
         "val_final_acc": s.get("final_acc"), "val_avg_acc": s.get("avg_acc")}
    )  # fmt: skip


def tune_method(
    job: TuneJob, space: dict[str, dict[str, list]], trials: int, scheduler: str, searcher: str, runtime: RuntimeConfig, cpus: float
) -> list[dict[str, Any]]:
    """Run `trials` trials of one method; its rows of the `trials` table (the best one chosen)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from bench.runtime.ray_cluster import ensure_ray

    ensure_ray(runtime)
    sched = ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2) if scheduler == "asha" else FIFOScheduler()
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search: Any = BasicVariantGenerator(random_state=job.seed)  # every method draws from the same seeded stream
    if searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise TuneError("--searcher optuna needs Optuna: pip install 'fedame-bench[tune]'") from None
        search = OptunaSearch(seed=job.seed)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": cpus}),
        param_space={k: tune_domain(v) for k, v in space.items()},
        tune_config=tune.TuneConfig(metric="acc_seen", mode="max", num_samples=trials, scheduler=sched, search_alg=search),
        run_config=tune.RunConfig(name=f"tune-{job.method}", storage_path=str(Path(job.out).resolve() / "ray_tune"), verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for i, result in enumerate(grid):
        m = result.metrics or {}
        done = bool(m.get("run_done"))  # Tune sets its own "done"; a finished run's summary is one report more
        params = {k: (result.config or {}).get(k) for k in space}
        rows.append(
            {"method": job.method, "trial": i, "params": json.dumps(params, sort_keys=True), "run_id": m.get("run_id"),
             "val_metric": m.get("val_metric"), "val_score": m.get("val_score") if done else None,
             "val_final_acc": m.get("val_final_acc") if done else None, "val_avg_acc": m.get("val_avg_acc") if done else None,
             "evaluations": int(m.get("training_iteration", 0)) - done, "status": "failed" if result.error else ("completed" if done else "stopped"),
             "wall_seconds": float(m.get("time_total_s", math.nan)), "chosen": False}
        )  # fmt: skip
    finished = [r for r in rows if r["val_score"] is not None]
    if not finished:
        raise TuneError(f"tune {job.method}: no trial finished (see {Path(job.out) / 'ray_tune'})")
    max(finished, key=lambda r: (r["val_score"], -r["trial"]))["chosen"] = True
    return rows


def write_trials(out: Path, method: str, rows: list[dict[str, Any]]) -> Path:
    path = out / "trials" / f"{method}.parquet"
    atomic_write(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows, schema=TRIALS), tmp))
    return path


def write_chosen(out: Path, chosen: dict[str, dict[str, Any]]) -> Path:
    """`chosen.yaml`: per method, the best trial's overrides, its validation score, the budget,
    the validation slice it trained without and the command that chose it (methods tuned by
    an earlier command into the same folder keep their entries)."""
    path = out / "chosen.yaml"
    old = yaml.safe_load(path.read_text()) if path.exists() else {}
    methods = {**(old or {}).get("methods", {}), **chosen}
    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump({"methods": methods}, sort_keys=True)))
    return path


def tuned_overrides(path: Path, method: str) -> list[str]:
    """`run --tuned FILE`: the overrides `tune` chose for `method`, and the validation slice
    its trials trained without (so the reported run trains on the same samples). A method
    with nothing to tune (no search space in configs/spaces/, e.g. a ranking by item counts)
    runs with its defaults."""
    if not path.exists():
        raise TuneError(f"--tuned {path}: no such file; `fedame-bench tune --out DIR` writes DIR/chosen.yaml")
    entry = ((yaml.safe_load(path.read_text()) or {}).get("methods") or {}).get(method)
    if entry is None and not (CONFIG_DIR / "spaces" / f"{method}.yaml").exists():
        return []
    if entry is None:
        raise TuneError(f"--tuned {path} has no choice for {method}; tune it first (fedame-bench tune -m {method} ...)")
    return [*(f"{k}={v}" for k, v in entry["set"].items()), f"data.val_fraction={entry['val_fraction']}"]


def replaced_choices(chosen: list[str], explicit: list[str]) -> list[str]:
    """The tuned choices the command line's --set replaces, one line each: the command line
    wins (an ablation of a tuned method) and says so."""
    given = {tuple(parse_override(o)[0]): o for o in explicit}
    return [f"--set {given[k]} replaces the tuned {o}" for o in chosen if (k := tuple(parse_override(o)[0])) in given]


def check_budget(trials: int, methods: list[str]) -> None:
    if trials < 1:
        raise ConfigError("--trials must be at least 1")
    if len(set(methods)) != len(methods):
        raise ConfigError("--methods lists a method twice")
