"""The baselines' commands for `fedame-bench` (the `fedame_bench.commands` entry point):
`bench-runtime`, the executor study run with FedAvg (baselines/runtime_study.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from bench.clikit import ConfigOpt, SetOpt, user_errors
from bench.progress import console


def add_commands(app: typer.Typer) -> None:
    app.command("bench-runtime")(user_errors(bench_runtime))


def bench_runtime(
    actors: Annotated[
        Optional[str],
        typer.Option("--actors", help="Ray actor counts to compare with local (default 1,2,4; small rounds: Ray's defaults only)"),
    ] = None,
    clients: Annotated[int, typer.Option("--clients")] = 8,
    rounds: Annotated[int, typer.Option("--rounds")] = 4,
    hidden: Annotated[int, typer.Option("--hidden", help="MLP head width (client compute)")] = 2048,
    per_class: Annotated[int, typer.Option("--per-class", help="synthetic training images per class")] = 800,
    gpus: Annotated[float, typer.Option("--gpus", help="GPUs the actors share (each of n actors asks for gpus/n)")] = 0.0,
    small_rounds: Annotated[
        bool, typer.Option("--small-rounds", help="Instead: the plain loop vs the executors on small rounds (5 clients, linear head)")
    ] = False,
    scale: Annotated[
        Optional[str],
        typer.Option("--scale", help="Instead: these client counts (e.g. 10,100,1000,10000) with --sampled per round, local and Ray"),
    ] = None,
    sampled: Annotated[int, typer.Option("--sampled", help="With --scale: clients sampled per round")] = 10,
    batched: Annotated[
        Optional[str], typer.Option("--batched", help="Instead: these clients-per-round counts (e.g. 5,50,500), one by one vs batched")
    ] = None,
    config: ConfigOpt = "cifar100_local",
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="With --scale: where the runs write their tables")] = Path(
        "/tmp/fedame-bench-scale"
    ),
) -> None:
    """Benchmark the executors on a client-compute-bound workload and print the figures."""
    from baselines.runtime_study import SMALL, run_benchmark, run_small_rounds

    if batched:
        from baselines.runtime_study import run_batched

        rows = run_batched([int(c) for c in batched.split(",") if c])
        table = Table(
            "clients per round",
            "path",
            "s/round",
            "rounds/s",
            "x the 5-client time",
            "final acc",
            title="batched client simulation: FedAvg linear head, 10,000 samples IID over the clients, local executor",
        )
        base = {r["path"]: r["s_per_round"] for r in rows if r["clients"] == rows[0]["clients"]}
        for r in rows:
            table.add_row(
                str(r["clients"]),
                r["path"],
                f"{r['s_per_round']:.4f}",
                f"{r['rounds_per_s']:.1f}",
                f"{r['s_per_round'] / base[r['path']]:.2f}",
                f"{r['final_acc']:.4f}",
            )
        console.print(table)
        return
    if scale:
        from baselines.runtime_study import run_scale

        counts = [int(c) for c in scale.split(",") if c]
        rows = run_scale(counts, sampled, ["local", "ray"], config, list(set_ or []), Path(out))
        table = Table(
            "executor",
            "clients",
            "sampled / round",
            "s/round",
            "peak memory GB (process tree, PSS)",
            "run s",
            title=f"many clients: FedAvg, IID, {config}, median s/round",
        )
        for r in rows:
            table.add_row(
                r["executor"], str(r["clients"]), str(r["sampled"]), f"{r['s_per_round']:.3f}", f"{r['peak_gb']:.2f}", f"{r['run_s']:.0f}"
            )
        console.print(table)
        return
    if small_rounds:
        table = Table(
            "executor",
            "s/round",
            "x plain loop",
            "client compute (critical path) s",
            "server hooks ms",
            "dispatch + wait ms",
            "overhead ms",
            title=f"small rounds: {SMALL['clients']} clients x {SMALL['per_client']} samples, linear head, "
            f"{SMALL['epochs']} epoch of batch {SMALL['batch_size']}, median of rounds 2-{SMALL['rounds']}",
        )
        for r in run_small_rounds([int(a) for a in actors.split(",") if a] if actors else None):
            table.add_row(
                r["executor"],
                f"{r['s_per_round']:.4f}",
                f"{r['vs_plain']:.2f}",
                f"{r['critical_s']:.4f}",
                f"{r['server_ms']:.1f}",
                f"{r['dispatch_ms']:.1f}",
                f"{r['overhead_ms']:.1f}",
            )
        console.print(table)
        return

    rows = run_benchmark([int(a) for a in (actors or "1,2,4").split(",") if a], clients, rounds, hidden, per_class, gpus)
    table = Table(
        "executor",
        "s/round",
        "updates/s",
        "client compute s (sum)",
        "critical path s",
        "overhead ms",
        "of which server ms",
        "overhead %",
        "MB/round",
        "GPU util %",
        title=f"{clients} clients, FedAvg MLP({hidden}) head, median of rounds 2-{rounds}",
    )
    for r in rows:
        table.add_row(
            r["executor"],
            f"{r['s_per_round']:.3f}",
            f"{r['updates_per_s']:.2f}",
            f"{r['client_compute_s']:.3f}",
            f"{r['critical_s']:.3f}",
            f"{r['overhead_ms']:.0f}",
            f"{r['server_ms']:.0f}",
            f"{r['overhead_pct']:.1f}",
            f"{r['bytes_per_round'] / 1e6:.2f}",
            "n/a" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.0f}",
        )
    console.print(table)
