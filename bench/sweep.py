"""A sweep: the grid of runs (methods x alphas x seeds), checked before any work starts,
run one after another (or concurrently on Ray), skipping runs already complete."""

from __future__ import annotations

import math
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.api import available_methods, get_method
from bench.checkpoint import CheckpointStore
from bench.config import ConfigError, ExperimentConfig
from bench.data import Dataset, load_dataset, resolve_data_dir
from bench.data.validation import held_out
from bench.errors import UserError
from bench.features import FeatureStore
from bench.loader import method_config
from bench.results import ResultWriter
from bench.runner import RunSpec, execute_run, run_row
from bench.runtime import executor_kind, make_executor
from bench.runtime.base import preflight_cluster, preflight_device
from bench.tracks import get_track
from bench.training import warm_up


def default_cache_dir(cfg: ExperimentConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("FEDAME_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedame-bench"


def parse_methods(text: str | None, cfg: ExperimentConfig) -> list[str]:
    names = cfg.sweep.methods if not text else [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError(
            f"{cfg.name} names no methods: pass --methods (e.g. --methods all; `fedame-bench methods` lists them) or set sweep.methods"
        )
    if names == ["all"]:
        return [name for name, cls in available_methods().items() if cfg.track in cls.tracks]
    _no_duplicates(names, "methods", text)
    for n in names:
        get_method(n)  # raises with the list of known methods
    return names


def parse_floats(text: str | None, default: list[float], what: str) -> list[float]:
    if not text:
        return list(default)
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} expects comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"--{what} values must be finite numbers, got {text}")
    if what == "alpha" and any(v <= 0 for v in vals):
        raise ConfigError(f"--alpha values must be > 0, got {text}; Dirichlet concentration is positive (e.g. 0.1,0.5)")
    _no_duplicates(vals, what, text)
    return vals


def parse_ints(text: str | None, default: list[int], what: str) -> list[int]:
    if not text:
        return list(default)
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} expects comma-separated integers, got {text!r}") from None
    _no_duplicates(vals, what, text)
    return vals


def _no_duplicates(vals: list, what: str, text: str | None) -> None:
    """Two equal grid values would plan two runs of one run id."""
    dup = sorted({str(v) for v in vals if vals.count(v) > 1})
    if dup:
        raise ConfigError(f"--{what} lists {', '.join(dup)} more than once ({text}); give each value once")


def expand(cfg: ExperimentConfig, methods: list[str], alphas: list[float], seeds: list[int]) -> list[RunSpec]:
    get_track(cfg.track)  # an unknown track is one error line
    specs = []
    for m in methods:
        method_config(cfg, m)  # validate every method's section before any work
        if cfg.track not in get_method(m).tracks:
            raise ConfigError(
                f"{m} does not run the {cfg.track} track (it runs {', '.join(get_method(m).tracks)}); "
                "`fedame-bench methods` lists the methods of each track"
            )
        for a in alphas:
            for s in seeds:
                c = ExperimentConfig.model_validate({**cfg.model_dump(), "seed": s, "scenario": {**cfg.scenario.model_dump(), "alpha": a}})
                specs.append(RunSpec(m, c, sweep=cfg.name))
    return specs


@dataclass
class Prepared:
    dataset: Dataset
    store: FeatureStore
    cache_dir: Path


def prepare(cfg: ExperimentConfig, specs: list[RunSpec], data_dir: str | None) -> Prepared:
    """Everything that can fail because of user input, done before the first run starts:
    data present, every scenario buildable, backbone weights loadable (features cached)."""
    preflight_device(cfg.runtime)
    preflight_cluster(cfg.runtime)
    warm_up()  # no run is charged the process's one-time costs of a first training step
    ds = load_dataset(cfg.data, resolve_data_dir(data_dir, cfg.data.root))
    views: dict[tuple[float, str, int], Dataset] = {}  # runs that differ only in method or alpha see one dataset
    for spec in specs:  # every run's stages can be built (a partition that cannot fit fails here)
        c = spec.config
        track = get_track(c.track)
        key = (c.data.val_fraction, c.eval.split, c.seed)
        if key not in views and not track.own_validation:
            views[key] = held_out(ds, *key)[0]
        seen = ds if track.own_validation else views[key]
        track(c, seen, seen.test_x)
    cache_dir = default_cache_dir(cfg)
    store = FeatureStore(ds, cfg.backbone, cache_dir)
    inputs = [get_method(s.method).input_for(method_config(s.config, s.method)) for s in specs]
    if "features" in inputs:
        store.features("train")
        store.features("test")
    for spec in specs:  # methods check their own inputs (anchors, model weights) up front
        get_method(spec.method).preflight(method_config(spec.config, spec.method), ds, cache_dir)
    if all(i == "features" for i in inputs):  # pixels are not needed again
        store.drop_images()
        ds = store.dataset
    return Prepared(ds, store, cache_dir)


def run_sweep(
    specs: list[RunSpec],
    prepared: Prepared,
    writer: ResultWriter,
    on_run_start: Callable[[RunSpec, Any], Any] | None = None,
    on_round: Callable[[RunSpec, dict], Any] | None = None,
    on_run_end: Callable[[RunSpec, dict | None, str], Any] | None = None,
    stop: threading.Event | None = None,
) -> list[dict]:
    """Run every spec not yet complete in `writer`; a failing run is recorded and the rest go on.
    A run interrupted after a task resumes from its checkpoint (bench/checkpoint.py);
    `on_run_start(spec, checkpoint or None)` says which.

    With the Ray executor and `runtime.max_concurrent_runs` > 1, that many runs share the
    cluster at once (each with its own client actors; Ray queues actors beyond its resources)."""
    todo = []
    for spec in specs:
        if writer.is_complete(spec.run_id):
            if on_run_end:
                on_run_end(spec, None, "skipped")
        else:
            todo.append(spec)

    stop = stop or threading.Event()  # set on Ctrl-C or a UserError: runs in other threads stop too
    with ctrl_c_sets(stop):
        results = _run_todo(todo, prepared, writer, stop, on_run_start, on_round, on_run_end)
    return [r for r in results if r is not None]


@contextmanager
def ctrl_c_sets(stop: threading.Event) -> Iterator[None]:
    """While runs go on, Ctrl-C sets `stop` instead of raising wherever the main thread is:
    Python prints and drops a KeyboardInterrupt raised inside a finalizer or callback (Ray's
    handles have them), so a raised interrupt can be lost; a flag cannot. Runs stop at the
    end of their round; a second Ctrl-C raises at once."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        os.write(2, b"stopping at the end of the current round (Ctrl-C again to stop now)\n")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        raise KeyboardInterrupt


def _run_todo(
    todo: list[RunSpec], prepared: Prepared, writer: ResultWriter, stop: threading.Event, on_run_start, on_round, on_run_end
) -> list[dict | None]:
    """Each run's summary (None for a failed or cancelled run); `stop` ends them at a round's end."""

    def round_done(spec: RunSpec, row: dict) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        if on_round:
            on_round(spec, row)

    checkpoints = CheckpointStore(writer.out)

    def one(spec: RunSpec) -> dict | None:
        if stop.is_set():
            return None
        resume = checkpoints.load(spec.run_id)
        if on_run_start:
            on_run_start(spec, resume)
        started = datetime.now(timezone.utc)
        executor = make_executor(spec.config.runtime)
        try:
            out = execute_run(
                spec,
                prepared.dataset,
                prepared.store,
                executor,
                str(prepared.cache_dir),
                on_round=lambda row, s=spec: round_done(s, row),
                resume=resume,
                save_checkpoint=checkpoints.save,
            )
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as e:  # a crashing run must not take the sweep down: record it
            err = f"{type(e).__name__}: {e}"
            row = run_row(spec, prepared.dataset.name, executor.name, "failed", err + "\n" + traceback.format_exc(), started)
            writer.write_run(spec.run_id, {"runs": [row]})
            if on_run_end:
                on_run_end(spec, None, f"failed: {err}")
            return None
        writer.write_run(spec.run_id, out.tables)
        checkpoints.drop(spec.run_id)
        if on_run_end:
            on_run_end(spec, out.summary, "completed")
        return out.summary

    rt = todo[0].config.runtime if todo else None
    if rt is not None and executor_kind(rt) == "ray" and (rt.max_concurrent_runs or 1) > 1:
        return _concurrently(one, todo, rt.max_concurrent_runs, stop)
    return [one(spec) for spec in todo]


def _concurrently(one: Callable[[RunSpec], dict | None], todo: list[RunSpec], workers: int, stop: threading.Event) -> list:
    """Runs in threads (each drives its own actors on the shared cluster). On Ctrl-C, queued
    runs are cancelled and running ones stop at the end of their current round; runs that
    completed are already written."""
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(one, spec) for spec in todo]
    try:
        while not all(f.done() for f in futures):
            if stop.is_set():
                raise KeyboardInterrupt
            wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)  # short waits keep Ctrl-C responsive
            for f in futures:
                if f.done() and f.exception() is not None:
                    raise f.exception()
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return [f.result() for f in futures]
