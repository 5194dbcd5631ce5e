"""The `fedame-bench` command line (typer + rich).

Every error a user can cause surfaces as one red line and exit code 2, before any work
when it can be known in advance; anything else keeps its traceback (it is a bug).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from bench.errors import UserError
from bench.progress import console, progress_bar

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated class-incremental learning benchmarks.")

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="YAML config path, or a name in configs/ (default, cifar100, smoke ...)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: key.sub=value (repeatable)")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Folder holding the dataset files (else FEDAME_DATA_DIR, data.root, ~/.cache)")]


SkipBadOpt = Annotated[bool, typer.Option("--skip-bad", help="Skip result files that are not readable Parquet (each is named) instead of stopping")]


def _warn_skipped(bad: list[Path] | None) -> None:
    for f in bad or []:
        console.print(f"[yellow]warning:[/] skipped {f}: not a readable Parquet file", highlight=False, soft_wrap=True)


def decision_line(summary: dict) -> str:
    """Where a run's expert decisions came from, and why any fell back to the rule."""
    s = summary
    n = s["decisions_llm"] + s["decisions_cache"] + s["decisions_rule"]
    line = f"{n} expert decisions: {s['decisions_llm']} llm, {s['decisions_cache']} cache, {s['decisions_rule']} rule"
    if s["decisions_fallback"]:
        line += f"; {s['decisions_fallback']} fell back to the rule ({s['fallback_reason']})"
    return line


def _say_interrupted() -> None:
    console.print("[yellow]interrupted: completed runs and tasks are saved; rerun the same command to resume[/]")


def user_errors(fn):
    """Turn UserErrors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _say_interrupted()
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def methods() -> None:
    """List the registered methods, one line each."""
    from bench.api import available_methods

    for name, cls in available_methods().items():  # plain lines: readable and greppable
        print(f"{name:<12} {cls.input:<9} {cls.summary}")


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


@app.command()
@user_errors
def run(
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
    require_llm: Annotated[bool, typer.Option("--require-llm", help="FedAME: any expert decision the LLM cannot make is an error, not a rule fallback")] = False,
) -> None:
    """Run a sweep (methods x alphas x seeds) and write Parquet results; resumes where it stopped."""
    from bench.config import load_config
    from bench.data import build_scenario, load_dataset, resolve_data_dir
    from bench.results import ResultWriter
    from bench.sweep import expand, parse_floats, parse_ints, parse_methods, prepare, run_sweep

    overrides = list(set_ or [])
    for key, val in (("runtime.executor", executor), ("runtime.address", address), ("runtime.gpus_per_client", gpus_per_client),
                     ("runtime.max_concurrent_runs", concurrent_runs)):
        if val is not None:
            overrides.append(f"{key}={val}")
    if require_llm:
        overrides.append("methods.fedame.llm.required=true")
    cfg = load_config(config, overrides)
    if cfg.data.dataset == "imagefolder":  # the folder is the dataset: recorded in the config and the run id
        cfg = load_config(config, [*overrides, f"data.root={resolve_data_dir(data_dir, cfg.data.root)}"])
    names = parse_methods(methods, cfg)
    alphas = parse_floats(alpha, cfg.sweep.alpha or [cfg.scenario.alpha], "alpha")
    seed_list = parse_ints(seeds, cfg.sweep.seeds or [cfg.seed], "seeds")
    specs = expand(cfg, names, alphas, seed_list)

    if dry_run:
        ds = load_dataset(cfg.data, resolve_data_dir(data_dir, cfg.data.root))
        for a in alphas:
            spec = next(s for s in specs if s.alpha == a)
            scen = build_scenario(spec.config.scenario, ds.train_y, ds.class_names, spec.seed, ds.train_domain, ds.domain_names)
            t = _counts_table(scen, ds)
            t.title = f"{t.title}, {cfg.scenario.partition} alpha={a}, seed={spec.seed}"
            console.print(t)
        return

    from bench.inputs import prepare_hint, require_inputs

    require_inputs(cfg, resolve_data_dir(data_dir, cfg.data.root), names, prepare_hint(config, data_dir, overrides))
    writer = ResultWriter(out)
    writer.check_writable()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console.print(f"[bold]sweep[/] {cfg.name}: {len(specs)} runs ({', '.join(names)} x alpha {alphas} x seeds {seed_list}) -> {out}")
    prepared = prepare(cfg, specs, data_dir)

    with progress_bar() as bar:
        sweep_job = bar.add_task("runs", total=len(specs))
        run_jobs: dict[str, int] = {}
        plain = not console.is_terminal  # logs and CI: a line per finished task instead of live bars

        def label(spec) -> str:
            return f"{spec.method} a={spec.alpha:g} s={spec.seed}"

        def start(spec, resume):
            total = spec.config.training.rounds * (len(spec.config.scenario.tasks or []) or spec.config.scenario.n_tasks or 1)
            run_jobs[spec.run_id] = bar.add_task(label(spec), total=total, completed=len(resume.progress.rounds_rows) if resume else 0)
            if plain and not resume:
                bar.console.print(f"{label(spec)}: starting", highlight=False)
            if resume:
                bar.console.print(f"{label(spec)}: resuming at task {resume.next_task} from {writer.out}/checkpoints/{spec.run_id}.pkl",
                                  highlight=False, soft_wrap=True)

        def round_done(spec, row):
            acc = "" if row["acc_seen"] is None else f" acc={row['acc_seen']:.3f}"
            bar.update(run_jobs[spec.run_id], advance=1, description=f"{label(spec)} t{row['task']}{acc}")
            if plain and row["round"] == spec.config.training.rounds - 1:
                bar.console.print(f"{label(spec)}: task {row['task']} done{acc}")

        def end(spec, summary, status):
            bar.advance(sweep_job)
            job = run_jobs.pop(spec.run_id, None)
            if job is not None:
                bar.remove_task(job)
            if status == "skipped":
                bar.console.print(f"{label(spec)}: already complete in {out}/ ({spec.run_id}); skipped", highlight=False)
            elif status != "completed":
                bar.console.print(f"{spec.run_id}: {status}")
            elif summary and summary.get("decisions_rule") is not None:
                bar.console.print(f"{label(spec)}: {decision_line(summary)}", highlight=False, soft_wrap=True)

        summaries = run_sweep(specs, prepared, writer, start, round_done, end)

    from bench.results import read_table

    summary = read_table(out, "summary").to_pylist()
    ids = {s.run_id for s in specs}
    table = Table(title=f"summary ({out})")
    for col in ("method", "alpha", "seed", "final_acc", "avg_acc", "forgetting", "bwt", "wall s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for row in sorted((r for r in summary if r["run_id"] in ids), key=lambda r: (r["method"], r["alpha"], r["seed"])):
        table.add_row(
            row["method"], f"{row['alpha']:g}", str(row["seed"]),
            *(f"{row[k]:.4f}" if row[k] is not None else "-" for k in ("final_acc", "avg_acc", "forgetting", "bwt")),
            f"{row['wall_seconds']:.1f}",
        )
    console.print(table)
    console.print(f"{len(summaries)} runs completed now, {len(specs) - len(summaries)} skipped or failed; tables in {out}/")


@app.command()
@user_errors
def report(
    results: Annotated[list[Path], typer.Argument(help="One or more results directories")],
    format: Annotated[str, typer.Option("--format", "-f", help="markdown | latex | csv")] = "markdown",
    metrics: Annotated[str, typer.Option("--metrics", help="Comma list: final_acc, avg_acc, forgetting, bwt, wall_seconds, bytes_down, bytes_up")] = "final_acc,avg_acc,forgetting",
    by: Annotated[str, typer.Option("--by", help="Settings that make the columns, e.g. alpha,dataset")] = "alpha",
    skip_bad: SkipBadOpt = False,
) -> None:
    """Print the paper table: methods x settings, mean ± std over seeds, best in bold."""
    from bench.report import report as make_report

    ms = [m.strip() for m in metrics.split(",") if m.strip()]
    cols = [b.strip() for b in by.split(",") if b.strip()]
    bad: list[Path] | None = [] if skip_bad else None
    text = make_report(results, format, ms, cols, bad)
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
    methods: Annotated[Optional[str], typer.Option("--methods", "-m", help="Methods whose inputs to make too (default: every method)")] = "all",
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Make the files a config reads (dataset, backbone, anchors) where they are missing; check the rest."""
    from bench.config import load_config
    from bench.data import resolve_data_dir
    from bench.inputs import InputError, prepare_inputs
    from bench.sweep import parse_methods

    cfg = load_config(config, list(set_ or []))
    outcomes = prepare_inputs(cfg, resolve_data_dir(data_dir, cfg.data.root), parse_methods(methods, cfg),
                              lambda line: console.print(line, highlight=False, soft_wrap=True))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise InputError(f"{len(failed)} of {len(outcomes)} inputs not ready: "
                         + "; ".join(f"{o.input.what} at {o.input.path}: {o.detail}" for o in failed))
    console.print(f"{len(outcomes)} inputs ready for {cfg.name}: "
                  + ", ".join(f"{o.input.what} {o.status}" for o in outcomes), highlight=False, soft_wrap=True)


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
    from bench.features.protocols import parse_classes, pretrain
    from bench.config import load_config
    from bench.data import load_dataset, resolve_data_dir

    cfg = load_config(config, list(set_ or []))
    ds = load_dataset(cfg.data, resolve_data_dir(data_dir, cfg.data.root))
    info = pretrain(ds, cfg.backbone, parse_classes(classes, ds.num_classes), epochs, out, batch_size, max_lr, seed=cfg.seed)
    console.print(f"wrote {out} (test accuracy {info['test_accuracy']:.4f} on {len(info['classes'])} classes) and {out.with_suffix('.json')}")


@app.command("probe-backbone")
@user_errors
def probe_backbone(
    config: ConfigOpt = "cifar100",
    classes: Annotated[Optional[list[str]], typer.Option("--classes", help="Class sets to probe, e.g. 0-49 (repeatable); default all")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file for the probe table")] = Path("results/probe.parquet"),
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Nearest-class-mean and linear-probe accuracy of the frozen features on chosen classes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.features.protocols import parse_classes, probe
    from bench.config import load_config
    from bench.data import load_dataset, resolve_data_dir
    from bench.features import FeatureStore
    from bench.sweep import default_cache_dir

    cfg = load_config(config, list(set_ or []))
    ds = load_dataset(cfg.data, resolve_data_dir(data_dir, cfg.data.root))
    sets = {spec: parse_classes(spec, ds.num_classes) for spec in (classes or [f"0-{ds.num_classes - 1}"])}
    rows = probe(FeatureStore(ds, cfg.backbone, default_cache_dir(cfg)), sets)
    table = Table("classes", "n classes", "NCM", "linear probe", "train", "test", title=f"frozen {rows[0]['backbone']} on {ds.name}")
    for r in rows:
        table.add_row(r["classes"], str(r["num_classes"]), f"{r['ncm']:.4f}", f"{r['linear_probe']:.4f}", str(r["n_train"]), str(r["n_test"]))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    console.print(f"wrote {out}")


@app.command("diagnose")
@user_errors
def diagnose(
    config: ConfigOpt = "cifar100_local",
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Dirichlet alpha (default: the config's)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Run seed (default: the config's)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file for the per-task diagnosis")] = Path("results/fedame_diagnosis.parquet"),
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run FedAME once (local executor) and measure, after every task, where its accuracy goes:
    new vs old classes, routing, per-expert accuracy, prompt quality (docs/fedame.md)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.config import load_config
    from bench.runner import execute_run
    from bench.runtime import make_executor
    from bench.sweep import expand, prepare
    from fedame.diagnose import diagnose_task

    cfg = load_config(config, list(set_ or []))
    specs = expand(cfg, ["fedame"], [cfg.scenario.alpha if alpha is None else alpha], [cfg.seed if seed is None else seed])
    prepared = prepare(cfg, specs, data_dir)
    ds, rows = prepared.dataset, []

    def after_task(server, task, scenario, train_x, test_x) -> None:
        rows.append(diagnose_task(server, task, list(scenario.tasks[task]), (train_x, ds.train_y), (test_x, ds.test_y)))
        r = rows[-1]
        console.print(f"task {task}: all {r['acc_all']:.3f} new {r['acc_new']:.3f} old {r['acc_old']:.3f} route {r['route_acc']:.3f}")

    spec = specs[0]
    with console.status(f"fedame on {cfg.name}, alpha {spec.alpha:g}, seed {spec.seed}"):
        execute_run(spec, ds, prepared.store, make_executor(spec.config.runtime.model_copy(update={"executor": "local"})),
                    str(prepared.cache_dir), on_task_end=after_task)
    table = Table("after task", *(str(r["task"]) for r in rows), title=f"FedAME diagnosis: {cfg.name}, alpha {spec.alpha:g}, "
                  f"seed {spec.seed}, {cfg.training.rounds} rounds x {cfg.training.local_epochs} epochs")
    for key in [k for k in rows[0] if k != "task"]:  # one metric per row: fits a terminal
        table.add_row(key, *(str(r[key]) if isinstance(r[key], int) else f"{r[key]:.3f}" for r in rows))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"run_id": spec.run_id, **r} for r in rows]), out)
    console.print(f"wrote {out}")


@app.command("bench-runtime")
@user_errors
def bench_runtime(
    actors: Annotated[Optional[str], typer.Option("--actors", help="Ray actor counts to compare with local (default 1,2,4; small rounds: Ray's defaults only)")] = None,
    clients: Annotated[int, typer.Option("--clients")] = 8,
    rounds: Annotated[int, typer.Option("--rounds")] = 4,
    hidden: Annotated[int, typer.Option("--hidden", help="MLP head width (client compute)")] = 2048,
    per_class: Annotated[int, typer.Option("--per-class", help="synthetic training images per class")] = 800,
    gpus: Annotated[float, typer.Option("--gpus", help="GPUs the actors share (each of n actors asks for gpus/n)")] = 0.0,
    small_rounds: Annotated[bool, typer.Option("--small-rounds", help="Instead: the plain loop vs the executors on small rounds (5 clients, linear head)")] = False,
    scale: Annotated[Optional[str], typer.Option("--scale", help="Instead: these client counts (e.g. 10,100,1000,10000) with --sampled per round, local and Ray")] = None,
    sampled: Annotated[int, typer.Option("--sampled", help="With --scale: clients sampled per round")] = 10,
    batched: Annotated[Optional[str], typer.Option("--batched", help="Instead: these clients-per-round counts (e.g. 5,50,500), one by one vs batched")] = None,
    config: ConfigOpt = "cifar100_local",
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="With --scale: where the runs write their tables")] = Path("/tmp/fedame-bench-scale"),
) -> None:
    """Benchmark the executors on a client-compute-bound workload and print the figures."""
    from bench.runtime.benchmark import SMALL, run_benchmark, run_small_rounds

    if batched:
        from bench.runtime.benchmark import run_batched

        rows = run_batched([int(c) for c in batched.split(",") if c])
        table = Table("clients per round", "path", "s/round", "rounds/s", "x the 5-client time", "final acc",
                      title="batched client simulation: FedAvg linear head, 10,000 samples IID over the clients, local executor")
        base = {r["path"]: r["s_per_round"] for r in rows if r["clients"] == rows[0]["clients"]}
        for r in rows:
            table.add_row(str(r["clients"]), r["path"], f"{r['s_per_round']:.4f}", f"{r['rounds_per_s']:.1f}",
                          f"{r['s_per_round'] / base[r['path']]:.2f}", f"{r['final_acc']:.4f}")
        console.print(table)
        return
    if scale:
        from bench.runtime.benchmark import run_scale

        counts = [int(c) for c in scale.split(",") if c]
        rows = run_scale(counts, sampled, ["local", "ray"], config, list(set_ or []), Path(out))
        table = Table("executor", "clients", "sampled / round", "s/round", "peak memory GB (process tree, PSS)", "run s",
                      title=f"many clients: FedAvg, IID, {config}, median s/round")
        for r in rows:
            table.add_row(r["executor"], str(r["clients"]), str(r["sampled"]), f"{r['s_per_round']:.3f}", f"{r['peak_gb']:.2f}", f"{r['run_s']:.0f}")
        console.print(table)
        return
    if small_rounds:
        table = Table("executor", "s/round", "x plain loop", "client compute (critical path) s", "server hooks ms",
                      "dispatch + wait ms", "overhead ms",
                      title=f"small rounds: {SMALL['clients']} clients x {SMALL['per_client']} samples, linear head, "
                            f"{SMALL['epochs']} epoch of batch {SMALL['batch_size']}, median of rounds 2-{SMALL['rounds']}")
        for r in run_small_rounds([int(a) for a in actors.split(",") if a] if actors else None):
            table.add_row(r["executor"], f"{r['s_per_round']:.4f}", f"{r['vs_plain']:.2f}", f"{r['critical_s']:.4f}",
                          f"{r['server_ms']:.1f}", f"{r['dispatch_ms']:.1f}", f"{r['overhead_ms']:.1f}")
        console.print(table)
        return

    rows = run_benchmark([int(a) for a in (actors or "1,2,4").split(",") if a], clients, rounds, hidden, per_class, gpus)
    table = Table("executor", "s/round", "updates/s", "client compute s (sum)", "critical path s", "overhead ms",
                  "of which server ms", "overhead %", "MB/round", "GPU util %",
                  title=f"{clients} clients, FedAvg MLP({hidden}) head, median of rounds 2-{rounds}")
    for r in rows:
        table.add_row(r["executor"], f"{r['s_per_round']:.3f}", f"{r['updates_per_s']:.2f}", f"{r['client_compute_s']:.3f}",
                      f"{r['critical_s']:.3f}", f"{r['overhead_ms']:.0f}", f"{r['server_ms']:.0f}",
                      f"{r['overhead_pct']:.1f}", f"{r['bytes_per_round'] / 1e6:.2f}",
                      "n/a" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.0f}")
    console.print(table)


def main() -> None:  # pragma: no cover
    """The entry point: a Ctrl-C that lands outside a command's own handling (while the
    process starts or exits) is exit code 130 too, never a death by the signal."""
    try:
        app()
    except KeyboardInterrupt:
        _say_interrupted()
        raise SystemExit(130) from None
