"""The `fedame-bench` command line (typer + rich).

Every error a user can cause surfaces as one red line and exit code 2, before any work
when it can be known in advance; anything else keeps its traceback (it is a bug).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from bench.clikit import ConfigOpt, DataDirOpt, RunCommand, SetOpt, add_method_commands, flag_overrides, say_interrupted, user_errors
from bench.progress import console, progress_bar

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated class-incremental learning benchmarks.")

SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad", help="Skip result files that are not readable Parquet (each is named) instead of stopping")
]


def _warn_skipped(bad: list[Path] | None) -> None:
    for f in bad or []:
        console.print(f"[yellow]warning:[/] skipped {f}: not a readable Parquet file", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def methods() -> None:
    """List the registered methods, one line each: name, input, the tracks it runs, summary."""
    from bench.api import available_methods

    for name, cls in available_methods().items():  # plain lines: readable and greppable
        print(f"{name:<12} {cls.input:<9} {','.join(cls.tracks):<18} {cls.summary}")


def _counts_table(scenario, ds) -> Table:
    counts = scenario.counts(ds.train_y)
    table = Table(title=f"samples per client and task ({ds.name}, {scenario.num_clients} clients)")
    table.add_column("task")
    table.add_column("classes", justify="right")
    for k in range(scenario.num_clients):
        table.add_column(f"client {k}", justify="right")
    table.add_column("total", justify="right")
    for t, row in enumerate(counts):
        table.add_row(str(t), str(len(scenario.tasks[t])), *map(str, row), str(int(row.sum())))
    classes = [[len(c) for c in scenario.client_classes(t, ds.train_y).values()] for t in range(scenario.num_tasks)]
    table.add_row("classes held", "", *(f"{min(col)}-{max(col)}" if min(col) != max(col) else str(col[0]) for col in zip(*classes)), "")
    if scenario.noise_std is not None:
        table.add_row("noise std", "", *(f"{s:g}" for s in scenario.noise_std), "")
    return table


@app.command(cls=RunCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def run(
    ctx: typer.Context,
    config: ConfigOpt = "default",
    methods: Annotated[Optional[str], typer.Option("--methods", "-m", help="Comma-separated methods, or 'all'")] = None,
    alpha: Annotated[Optional[str], typer.Option("--alpha", help="Comma-separated Dirichlet alphas, e.g. 0.1,0.5")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="Comma-separated seeds, e.g. 0,1,2")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results directory (Parquet tables)")] = Path("results"),
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    executor: Annotated[Optional[str], typer.Option("--executor", help="local | ray | auto")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Join an existing Ray cluster")] = None,
    gpus_per_client: Annotated[Optional[float], typer.Option("--gpus-per-client", help="GPU fraction per client actor")] = None,
    concurrent_runs: Annotated[Optional[int], typer.Option("--concurrent-runs", help="Runs sharing the Ray cluster at once")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-client, per-task sample counts and exit")] = False,
    tuned: Annotated[
        Optional[Path], typer.Option("--tuned", help="chosen.yaml of `fedame-bench tune`: each method runs with its own chosen overrides")
    ] = None,
) -> None:
    """Run a sweep (methods x alphas x seeds) and write Parquet results; resumes where it stopped."""
    from bench.data import resolve_data_dir
    from bench.loader import load_config
    from bench.prepare import prepare_hint, require_inputs
    from bench.results import ResultWriter
    from bench.sweep import ctrl_c_sets, expand, parse_floats, parse_ints, parse_methods, prepare, run_sweep

    runtime = {
        "runtime.executor": executor,
        "runtime.address": address,
        "runtime.gpus_per_client": gpus_per_client,
        "runtime.max_concurrent_runs": concurrent_runs,
    }
    overrides = [*(set_ or []), *(f"{k}={v}" for k, v in runtime.items() if v is not None), *flag_overrides(ctx.args)]
    cfg = load_config(config, overrides)
    if cfg.data.dataset == "imagefolder":  # the folder is the dataset: recorded in the config and the run id
        overrides.append(f"data.root={resolve_data_dir(data_dir, cfg.data.root)}")
        cfg = load_config(config, overrides)
    names = parse_methods(methods, cfg)
    alphas = parse_floats(alpha, cfg.sweep.alpha or [cfg.scenario.alpha], "alpha")
    seed_list = parse_ints(seeds, cfg.sweep.seeds or [cfg.seed], "seeds")
    if tuned is None:
        specs = expand(cfg, names, alphas, seed_list)
    else:  # each method on the config with its own choice (and the slice it was chosen without)
        from bench.tune import replaced_choices, tuned_overrides

        specs = []
        for m in names:
            chosen = tuned_overrides(tuned, m)
            for line in replaced_choices(chosen, overrides):
                console.print(f"{m}: {line}")
            specs += expand(load_config(config, [*chosen, *overrides]), [m], alphas, seed_list)
    if dry_run:
        _print_counts(cfg, specs, alphas, data_dir)
        return
    require_inputs(cfg, resolve_data_dir(data_dir, cfg.data.root), names, prepare_hint(config, data_dir, overrides))
    writer = ResultWriter(out)
    writer.check_writable()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console.print(f"[bold]sweep[/] {cfg.name}: {len(specs)} runs ({', '.join(names)} x alpha {alphas} x seeds {seed_list}) -> {out}")
    stop = threading.Event()
    with ctrl_c_sets(stop):  # from here a Ctrl-C sets a flag (it cannot be lost) and stops before the next run
        prepared = prepare(cfg, specs, data_dir)
        with progress_bar() as bar:
            display = SweepDisplay(bar, out, len(specs))
            summaries = run_sweep(specs, prepared, writer, display.start, display.round_done, display.end, stop=stop)
    _print_summary(out, specs)
    console.print(f"{len(summaries)} runs completed now, {len(specs) - len(summaries)} skipped or failed; tables in {out}/")


def _print_counts(cfg, specs, alphas: list[float], data_dir: str | None) -> None:
    """`--dry-run`: each alpha's per-client, per-task sample counts."""
    from bench.data import build_scenario, load_dataset, resolve_data_dir
    from bench.data.validation import held_out

    ds = load_dataset(cfg.data, resolve_data_dir(data_dir, cfg.data.root))
    for a in alphas:
        spec = next(s for s in specs if s.alpha == a)
        c = spec.config
        seen = held_out(ds, c.data.val_fraction, c.eval.split, c.seed)[0]  # without the validation slice, if any
        if c.track != "class_incremental":
            console.print(_stage_sizes(c, seen, f"alpha={a}, seed={spec.seed}"))
            continue
        scen = build_scenario(c.scenario, seen.train_y, seen.class_names, spec.seed, seen.train_domain, seen.domain_names)
        t = _counts_table(scen, seen)
        t.title = f"{t.title}, {cfg.scenario.partition} alpha={a}, seed={spec.seed}"
        console.print(t)


def _stage_sizes(cfg, ds, what: str) -> Table:
    """`--dry-run` for any track: per stage, the clients holding data, those its rounds train
    and those joining at its end, their training samples (total, min, median, max), and the
    track's own description of the scenario."""
    from bench.tracks import get_track

    track = get_track(cfg.track)(cfg, ds, ds.test_x)
    table = Table(title=f"{cfg.track}: {json.dumps(track.describe())}, {what}")
    for col in ("stage", "clients", "training", "joining", "samples", "min", "median", "max"):
        table.add_column(col, justify="right")
    for t in range(track.num_stages):
        sizes = np.array([len(ix) for ix in track.stage(t).client_indices])
        training = track.participants(t)
        counts = (len(sizes), len(sizes) if training is None else len(training), len(track.joiners(t)))
        table.add_row(str(t), *map(str, counts), str(sizes.sum()), str(sizes.min()), f"{np.median(sizes):g}", str(sizes.max()))
    return table


def label(spec) -> str:
    return f"{spec.method} a={spec.alpha:g} s={spec.seed}"


class SweepDisplay:
    """A sweep's progress: a bar per run under a bar for the sweep; in plain output (logs, CI) a
    line when a run starts and when a task ends; a method's own line when one of its runs ends."""

    def __init__(self, bar, out: Path, total: int) -> None:
        self.bar, self.out, self.runs = bar, out, {}
        self.sweep_job = bar.add_task("runs", total=total)
        self.plain = not console.is_terminal

    def start(self, spec, resume) -> None:
        total = spec.config.training.rounds * (len(spec.config.scenario.tasks or []) or spec.config.scenario.n_tasks or 1)
        done = len(resume.progress.rounds_rows) if resume else 0
        self.runs[spec.run_id] = self.bar.add_task(label(spec), total=total, completed=done)
        if self.plain and not resume:
            self.bar.console.print(f"{label(spec)}: starting", highlight=False)
        if resume:
            self.bar.console.print(
                f"{label(spec)}: resuming at task {resume.next_task} from {self.out}/checkpoints/{spec.run_id}.pkl",
                highlight=False,
                soft_wrap=True,
            )

    def round_done(self, spec, row) -> None:
        acc = "" if row["acc_seen"] is None else f" acc={row['acc_seen']:.3f}"
        self.bar.update(self.runs[spec.run_id], advance=1, description=f"{label(spec)} t{row['task']}{acc}")
        if self.plain and row["round"] == spec.config.training.rounds - 1:
            self.bar.console.print(f"{label(spec)}: task {row['task']} done{acc}")

    def end(self, spec, summary, status) -> None:
        from bench.api import get_method

        self.bar.advance(self.sweep_job)
        job = self.runs.pop(spec.run_id, None)
        if job is not None:
            self.bar.remove_task(job)
        if status == "skipped":
            self.bar.console.print(f"{label(spec)}: already complete in {self.out}/ ({spec.run_id}); skipped", highlight=False)
        elif status != "completed":
            self.bar.console.print(f"{spec.run_id}: {status}")
        elif summary and (line := get_method(spec.method).run_line(summary)):
            self.bar.console.print(f"{label(spec)}: {line}", highlight=False, soft_wrap=True)


def _print_summary(out: Path, specs) -> None:
    """The sweep's runs as a table, read back from the summary files."""
    from bench.results import read_table
    from bench.tracks import get_track

    summary = read_table(out, "summary").to_pylist()
    ids = {s.run_id for s in specs}
    table = Table(title=f"summary ({out})")
    headline = list(dict.fromkeys(m for track in {s.config.track for s in specs} for m in get_track(track).headline))
    for col in ("method", "alpha", "seed", *headline, "wall s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for row in sorted((r for r in summary if r["run_id"] in ids), key=lambda r: (r["method"], r["alpha"], r["seed"])):
        table.add_row(
            row["method"],
            f"{row['alpha']:g}",
            str(row["seed"]),
            *(f"{row[k]:.4f}" if row.get(k) is not None else "-" for k in headline),
            f"{row['wall_seconds']:.1f}",
        )
    console.print(table)


@app.command()
@user_errors
def tune(
    config: ConfigOpt = "default",
    methods: Annotated[
        Optional[str], typer.Option("--methods", "-m", help="Comma-separated methods or 'all'; each gets the same --trials")
    ] = None,
    trials: Annotated[int, typer.Option("--trials", help="Trials per method (the same budget for every method)")] = 8,
    scheduler: Annotated[
        str, typer.Option("--scheduler", help="fifo (every trial to its end) | asha (stops trials early: its rungs see no forgetting)")
    ] = "fifo",
    searcher: Annotated[str, typer.Option("--searcher", help="random | optuna (pip install 'fedame-bench[tune]')")] = "random",
    spaces: Annotated[Path, typer.Option("--spaces", help="Folder of <method>.yaml search spaces")] = Path("configs/spaces"),
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Dirichlet alpha of every trial (default: the config's)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of every trial (default: the config's)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Trials table, chosen.yaml, every trial's run tables")] = Path("tune"),
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Join an existing Ray cluster")] = None,
    cpus_per_trial: Annotated[int, typer.Option("--cpus-per-trial", help="CPUs (and torch threads) per trial")] = 1,
) -> None:
    """Choose each method's hyperparameters on the validation split with Ray Tune (docs/results.md, "Validation protocol")."""
    from bench.config import RuntimeConfig
    from bench.loader import load_config
    from bench.sweep import parse_methods
    from bench.tune import TuneError, TuneJob, check_budget, read_space, tune_method, validation_overrides, write_chosen, write_trials

    if scheduler not in ("asha", "fifo") or searcher not in ("random", "optuna"):
        raise TuneError("--scheduler is asha or fifo, --searcher random or optuna")
    overrides = [*validation_overrides(config, list(set_ or [])), f"runtime.torch_threads={cpus_per_trial}"]
    cfg = load_config(config, overrides)
    names = parse_methods(methods, cfg)
    check_budget(trials, names)
    job_spaces = {m: read_space(spaces / f"{m}.yaml") for m in names}  # every space checked before any trial
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["fedame-bench tune -c", config, "-m", ",".join(names), "--trials", str(trials), "--scheduler", scheduler, "--searcher", searcher,
         *(["--alpha", str(alpha)] if alpha is not None else []), *(["--seed", str(seed)] if seed is not None else []),
         *(f"--set {o}" for o in set_ or [])]
    )  # fmt: skip
    console.print(f"[bold]tune[/] {cfg.name}: {', '.join(names)} x {trials} trials ({scheduler}, {searcher}) on val -> {out}")
    chosen = {}
    for m in names:
        job = TuneJob(
            config,
            m,
            tuple(overrides),
            data_dir,
            str(out),
            cfg.seed if seed is None else seed,
            cfg.scenario.alpha if alpha is None else alpha,
        )
        rows = tune_method(job, job_spaces[m], trials, scheduler, searcher, RuntimeConfig(address=address), cpus_per_trial)
        write_trials(out, m, rows)
        best = next(r for r in rows if r["chosen"])
        chosen[m] = {
            "set": json.loads(best["params"]), "val_metric": best["val_metric"], "val_score": best["val_score"],
            **({"val_final_acc": best["val_final_acc"]} if best["val_final_acc"] is not None else {}), "trials": trials, "chosen_by": command,
            "val_fraction": cfg.data.val_fraction, "scheduler": scheduler, "searcher": searcher,
        }  # fmt: skip
        console.print(
            f"{m}: best of {trials} trials val {best['val_metric']} {best['val_score']:.4f} with {best['params']}", highlight=False
        )
    console.print(f"chosen overrides in {write_chosen(out, chosen)}; trials in {out / 'trials'}/")


@app.command()
@user_errors
def report(
    results: Annotated[list[Path], typer.Argument(help="One or more results directories")],
    format: Annotated[str, typer.Option("--format", "-f", help="markdown | latex | csv")] = "markdown",
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics",
            help="Comma list of summary columns (final_acc, avg_acc, forgetting, bwt; hr10, ndcg10, hr10_full, ndcg10_full, "
            "hr10_at_val, ...; wall_seconds, bytes_down, bytes_up); default: the track's headline",
        ),
    ] = "",
    by: Annotated[str, typer.Option("--by", help="Settings that make the columns, e.g. alpha,dataset")] = "alpha",
    skip_bad: SkipBadOpt = False,
) -> None:
    """Print the paper table: methods x settings, mean ± std over seeds, best in bold."""
    from bench.report import report as make_report

    ms = [m.strip() for m in metrics.split(",") if m.strip()]
    cols = [b.strip() for b in by.split(",") if b.strip()]
    bad: list[Path] | None = [] if skip_bad else None
    text = make_report(results, format, ms or None, cols, bad)
    _warn_skipped(bad)
    print(text)


@app.command()
@user_errors
def plot(
    results: Annotated[list[Path], typer.Argument(help="One or more results directories")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the figures")] = Path("figures"),
    skip_bad: SkipBadOpt = False,
) -> None:
    """Write the paper figures (PNG and PDF)."""
    from bench.plot import plot as make_plots

    bad: list[Path] | None = [] if skip_bad else None
    written = make_plots(results, out, bad)
    _warn_skipped(bad)
    for p in written:
        console.print(f"wrote {p}")


@app.command("prepare")
@user_errors
def prepare_cmd(
    config: ConfigOpt = "cifar100_local",
    methods: Annotated[
        Optional[str], typer.Option("--methods", "-m", help="Methods whose inputs to make too (default: every method)")
    ] = "all",
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Make the files a config reads (dataset, backbone, anchors) where they are missing; check the rest."""
    from bench.data import resolve_data_dir
    from bench.inputs import InputError
    from bench.loader import load_config
    from bench.prepare import prepare_inputs
    from bench.sweep import parse_methods

    cfg = load_config(config, list(set_ or []))
    outcomes = prepare_inputs(
        cfg,
        resolve_data_dir(data_dir, cfg.data.root),
        parse_methods(methods, cfg),
        lambda line: console.print(line, highlight=False, soft_wrap=True),
    )
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise InputError(
            f"{len(failed)} of {len(outcomes)} inputs not ready: "
            + "; ".join(f"{o.input.what} at {o.input.path}: {o.detail}" for o in failed)
        )
    console.print(
        f"{len(outcomes)} inputs ready for {cfg.name}: " + ", ".join(f"{o.input.what} {o.status}" for o in outcomes),
        highlight=False,
        soft_wrap=True,
    )


@app.command("pretrain-backbone")
@user_errors
def pretrain_backbone(
    config: ConfigOpt = "cifar100",
    classes: Annotated[str, typer.Option("--classes", help="Classes to train on, e.g. 0-49")] = "0-49",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    out: Annotated[Path, typer.Option("--out", "-o", help="State dict to write (a JSON goes beside it)")] = Path("weights/backbone.pt"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    max_lr: Annotated[float, typer.Option("--max-lr")] = 0.2,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Train the configured backbone centrally on base classes (the B50 protocol) and save it."""
    from bench.data import load_dataset, resolve_data_dir
    from bench.features.protocols import parse_classes, pretrain
    from bench.loader import load_config

    cfg = load_config(config, list(set_ or []))
    ds = load_dataset(cfg.data, resolve_data_dir(data_dir, cfg.data.root))
    info = pretrain(ds, cfg.backbone, parse_classes(classes, ds.num_classes), epochs, out, batch_size, max_lr, seed=cfg.seed)
    console.print(
        f"wrote {out} (test accuracy {info['test_accuracy']:.4f} on {len(info['classes'])} classes) and {out.with_suffix('.json')}"
    )


@app.command("probe-backbone")
@user_errors
def probe_backbone(
    config: ConfigOpt = "cifar100",
    classes: Annotated[
        Optional[list[str]], typer.Option("--classes", help="Class sets to probe, e.g. 0-49 (repeatable); default all")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file for the probe table")] = Path("results/probe.parquet"),
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Nearest-class-mean and linear-probe accuracy of the frozen features on chosen classes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.data import load_dataset, resolve_data_dir
    from bench.features import FeatureStore
    from bench.features.protocols import parse_classes, probe
    from bench.loader import load_config
    from bench.sweep import default_cache_dir

    cfg = load_config(config, list(set_ or []))
    ds = load_dataset(cfg.data, resolve_data_dir(data_dir, cfg.data.root))
    sets = {spec: parse_classes(spec, ds.num_classes) for spec in (classes or [f"0-{ds.num_classes - 1}"])}
    rows = probe(FeatureStore(ds, cfg.backbone, default_cache_dir(cfg)), sets)
    table = Table("classes", "n classes", "NCM", "linear probe", "train", "test", title=f"frozen {rows[0]['backbone']} on {ds.name}")
    for r in rows:
        table.add_row(
            r["classes"], str(r["num_classes"]), f"{r['ncm']:.4f}", f"{r['linear_probe']:.4f}", str(r["n_train"]), str(r["n_test"])
        )
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    console.print(f"wrote {out}")


def main() -> None:  # pragma: no cover
    """The entry point: a Ctrl-C that lands outside a command's own handling (while the
    process starts or exits) is exit code 130 too, never a death by the signal."""
    try:
        app()
    except KeyboardInterrupt:
        say_interrupted()
        code: object = 130
    except SystemExit as e:
        code = e.code
    if code == 130:
        forget_unhandled_interrupt()
    # the command is over: a Ctrl-C now (while the interpreter shuts down, after Python has
    # put the default action back) must not turn the exit code into a death by the signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(code)


def forget_unhandled_interrupt() -> None:
    """Clear CPython's flag that makes the interpreter kill itself with SIGINT at exit.

    An evaluation through the PyRun_* API (native code makes them, e.g. while importing) that a
    KeyboardInterrupt ends sets that flag, even when our handler catches the exception further
    up; under `python -m` the process then printed its "interrupted" line and still died by
    the signal (exit -2 instead of 130). Every PyRun_* evaluation resets the flag first, so
    evaluating an empty string clears it."""
    import ctypes

    ctypes.pythonapi.PyRun_SimpleString(b"")


add_method_commands(app)
