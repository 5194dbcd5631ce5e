"""FedAME's commands for `fedame-bench` (the `fedame_bench.commands` entry point): `diagnose`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from bench.clikit import ConfigOpt, DataDirOpt, SetOpt, user_errors
from bench.progress import console


def add_commands(app: typer.Typer) -> None:
    app.command("diagnose")(user_errors(diagnose))


def diagnose(
    config: ConfigOpt = "cifar100_local",
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Dirichlet alpha (default: the config's)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Run seed (default: the config's)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file for the per-task diagnosis")] = Path(
        "results/fedame_diagnosis.parquet"
    ),
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run FedAME once (local executor) and measure, after every task, where its accuracy goes:
    new vs old classes, routing, per-expert accuracy, prompt quality (docs/fedame.md)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.loader import load_config
    from bench.runner import execute_run
    from bench.runtime import make_executor
    from bench.sweep import expand, prepare
    from fedame.diagnose import diagnose_task

    cfg = load_config(config, list(set_ or []))
    specs = expand(cfg, ["fedame"], [cfg.scenario.alpha if alpha is None else alpha], [cfg.seed if seed is None else seed])
    prepared = prepare(cfg, specs, data_dir)
    ds, rows = prepared.dataset, []

    def after_task(server, task, track, train_x, test_x) -> None:
        classes = list(track.scenario.tasks[task])  # a class-incremental run: its task's classes
        rows.append(diagnose_task(server, task, classes, (train_x, ds.train_y), (test_x, ds.test_y)))
        r = rows[-1]
        console.print(f"task {task}: all {r['acc_all']:.3f} new {r['acc_new']:.3f} old {r['acc_old']:.3f} route {r['route_acc']:.3f}")

    spec = specs[0]
    with console.status(f"fedame on {cfg.name}, alpha {spec.alpha:g}, seed {spec.seed}"):
        execute_run(
            spec,
            ds,
            prepared.store,
            make_executor(spec.config.runtime.model_copy(update={"executor": "local"})),
            str(prepared.cache_dir),
            on_task_end=after_task,
        )
    table = Table(
        "after task",
        *(str(r["task"]) for r in rows),
        title=f"FedAME diagnosis: {cfg.name}, alpha {spec.alpha:g}, "
        f"seed {spec.seed}, {cfg.training.rounds} rounds x {cfg.training.local_epochs} epochs",
    )
    for key in [k for k in rows[0] if k != "task"]:  # one metric per row: fits a terminal
        table.add_row(key, *(str(r[key]) if isinstance(r[key], int) else f"{r[key]:.3f}" for r in rows))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"run_id": spec.run_id, **r} for r in rows]), out)
    console.print(f"wrote {out}")
