"""Paper figures from Parquet results alone (matplotlib, PNG + PDF, readable in greyscale:
every method has its own marker and line style, bars have hatches)."""

from __future__ import annotations

import json
from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.api import available_methods  # noqa: E402
from bench.report import check_mergeable, load, tracks_of  # noqa: E402
from bench.results import read_table  # noqa: E402

STYLES = list(zip("osD^vP*X", ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), "-"]))
HATCHES = ["", "//", "\\\\", "xx", "..", "oo", "--", "++"]
GREYS = ["0.0", "0.35", "0.55", "0.2", "0.45", "0.65", "0.1", "0.75"]


def _style(methods: list[str]) -> dict[str, dict]:
    return {m: {"marker": mk, "linestyle": ls, "color": g} for m, (mk, ls), g in zip(methods, cycle(STYLES), cycle(GREYS))}


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    if fig._suptitle is None:  # figures with a shared legend were laid out by _legend
        fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def _legend(fig, methods: list[str], style: dict[str, dict], title: str) -> None:
    """One legend for the figure naming every method (whatever panel it appears in) and a
    title naming what was run."""
    handles = [plt.Line2D([], [], **style[m]) for m in methods]
    fig.legend(handles, methods, loc="lower center", ncol=min(len(methods), 6), fontsize="small", frameon=False)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))


def panels(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def plot(dirs: list[Path], out: Path, bad: list[Path] | None = None) -> list[Path]:
    summary, runs = load(dirs, bad)
    what = ", ".join(sorted(runs.dataset.dropna().unique())) + " (" + ", ".join(sorted(runs.sweep.dropna().unique())) + ")"
    rounds = pd.concat([read_table(d, "rounds", bad).to_pandas() for d in dirs], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tracks = tracks_of(runs)
    if (runs.attack != "none").any() or runs.aggregation.nunique() > 1:  # a robustness sweep
        check_mergeable(runs, ["alpha", "aggregation", "attack"])
        written = robustness(rounds.merge(runs[["run_id", "aggregation", "attack", "malicious", "alpha", "seed"]], on="run_id"), out, what)
        if any(t.name == "class_incremental" for t in tracks):
            return written  # a class-incremental robustness sweep: the rule-by-attack figures only
    else:
        check_mergeable(runs, ["alpha"])
    rounds = rounds.merge(runs[["run_id", "alpha", "seed"]], on="run_id")
    methods = sorted(runs.method.unique())
    alphas = sorted(runs.alpha.unique())
    style = _style(methods)
    for track in tracks:  # a track's own figures (the class-incremental ones follow)
        extra = {name: pd.concat([read_table(d, name, bad).to_pandas() for d in dirs], ignore_index=True) for name in track.extra_tables}
        for name, fig in track.figures(rounds, extra, style).items():
            written += _save(fig, out, name)
    if all(t.name != "class_incremental" for t in tracks):
        return written + method_figures(dirs, runs, rounds, out, bad)

    # 1. accuracy on all seen classes after each task, one panel per alpha
    ends = rounds.dropna(subset=["acc_seen"]).sort_values("round").groupby(["run_id", "task"]).tail(1)
    fig, axes = panels(len(alphas))
    for ax, a in zip(axes, alphas):
        for m in methods:
            sel = ends[(ends.method == m) & (ends.alpha == a)].groupby("task").acc_seen.agg(["mean", "std"])
            if sel.empty:
                continue
            mean, std = sel["mean"] * 100, sel["std"].fillna(0) * 100
            yerr = [np.minimum(std, mean), np.minimum(std, 100 - mean)]  # an accuracy bar stays within 0-100%
            ax.errorbar(sel.index + 1, mean, yerr=yerr, label=m, capsize=3, **style[m])
        ax.set(title=f"alpha = {a:g}", xlabel="tasks learned", ylabel="accuracy on seen classes (%)")
        ax.grid(alpha=0.3)
    _legend(fig, methods, style, f"accuracy after each task: {what}")
    written += _save(fig, out, "accuracy_per_task")

    # 2. accuracy per round (global round index), one panel per alpha
    fig, axes = panels(len(alphas))
    ev = rounds.dropna(subset=["acc_seen"]).copy()
    per_task = ev.groupby("run_id")["round"].transform("max") + 1
    ev["global_round"] = ev.task * per_task + ev["round"] + 1
    for ax, a in zip(axes, alphas):
        for m in methods:
            sel = ev[(ev.method == m) & (ev.alpha == a)].groupby("global_round").acc_seen.mean()
            if not sel.empty:
                ax.plot(sel.index, sel.values * 100, label=m, markevery=max(1, len(sel) // 10), **style[m])
        ax.set(title=f"alpha = {a:g}", xlabel="communication round", ylabel="accuracy on seen classes (%)")
        ax.grid(alpha=0.3)
    _legend(fig, methods, style, f"accuracy per round: {what}")
    written += _save(fig, out, "accuracy_per_round")

    # 3. forgetting per method as bars, grouped by alpha
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods) * len(alphas), 3.4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [summary[(summary.method == m) & (summary.alpha == a)].forgetting for a in alphas]
        means = [v.mean() * 100 for v in vals]
        stds = [(v.std() if len(v) > 1 else 0) * 100 for v in vals]
        ax.bar(
            np.arange(len(alphas)) + i * width,
            means,
            width,
            yerr=stds,
            label=m,
            color="white",
            edgecolor="black",
            hatch=HATCHES[i % len(HATCHES)],
            capsize=3,
        )
    ax.set_xticks(np.arange(len(alphas)) + width * (len(methods) - 1) / 2, [f"alpha = {a:g}" for a in alphas])
    ax.set(ylabel="forgetting (%, lower is better)")
    ax.legend(fontsize="small")
    written += _save(fig, out, "forgetting")

    return written + method_figures(dirs, runs, rounds, out, bad)


def method_figures(dirs: list[Path], runs: pd.DataFrame, rounds: pd.DataFrame, out: Path, bad: list[Path] | None) -> list[Path]:
    """Each method's own figures (Server.figures), from its rounds and its extra tables."""
    written: list[Path] = []
    for m in sorted(runs.method.unique()):
        cls = available_methods().get(m)
        if cls is None:
            continue
        ids = set(runs.run_id[runs.method == m])
        extra = {}
        for name in cls.extra_tables:
            frame = pd.concat([read_table(d, name, bad).to_pandas() for d in dirs], ignore_index=True)
            extra[name] = frame[frame.run_id.isin(ids)]
        for name, fig in cls.figures(rounds[rounds.method == m].copy(), extra).items():
            written += _save(fig, out, name)
    return written


def robustness(rounds: pd.DataFrame, out: Path, what: str) -> list[Path]:
    """The share of each round's aggregate that came from the malicious clients, per rule
    (mean over seeds and alphas); one panel per method and attack."""
    attacked = rounds[rounds.attack != "none"].copy()
    if attacked.empty:
        return []
    attacked["step"] = attacked.groupby("run_id").cumcount() + 1
    cells = sorted({(m, a) for m, a in zip(attacked.method, attacked.attack)})
    rules = sorted(attacked.aggregation.unique())
    style = _style(rules)
    fig, axes = panels(len(cells))
    for ax, (m, a) in zip(axes, cells):
        sel = attacked[(attacked.method == m) & (attacked.attack == a)]
        for rule in rules:
            line = sel[sel.aggregation == rule].groupby("step").malicious_share.mean()
            if not line.empty:
                ax.plot(line.index, line.to_numpy() * 100, markevery=max(1, len(line) // 10), **style[rule])
        ax.set(title=f"{m}, {a}", xlabel="round (all tasks)", ylabel="malicious clients' share (%)")
        ax.grid(alpha=0.3)
    _legend(fig, rules, style, f"share of the aggregate from malicious clients: {what}")
    written = _save(fig, out, "malicious_share")
    return written + attention_weights(attacked, out, what)


MALICIOUS = {"color": "0.0", "linestyle": "-", "marker": "x"}
HONEST = {"color": "0.6", "linestyle": ":"}


def attention_weights(attacked: pd.DataFrame, out: Path, what: str) -> list[Path]:
    """Each client's attention weight per round (first seed and alpha of each setting): who
    the server trusted; malicious clients drawn solid, honest ones dotted."""
    att = attacked[attacked.aggregation == "attention"]
    if att.empty:
        return []
    cells = sorted({(m, a) for m, a in zip(att.method, att.attack)})
    fig, axes = panels(len(cells))
    for ax, (m, a) in zip(axes, cells):
        run = att[(att.method == m) & (att.attack == a)].sort_values(["seed", "alpha"]).run_id.iloc[0]
        sel = att[att.run_id == run].sort_values("step")
        shares = pd.DataFrame([json.loads(x) if isinstance(x, str) else {} for x in sel.agg_shares], index=sel.step)
        bad = set(json.loads(sel["malicious"].iloc[0] or "[]"))
        for k in sorted(shares.columns, key=int):
            evil = int(k) in bad
            ax.plot(shares.index, shares[k] * 100, **(MALICIOUS if evil else HONEST))
        ax.set(title=f"{m}, {a}", xlabel="round (all tasks)", ylabel="attention weight (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], **MALICIOUS), plt.Line2D([], [], **HONEST)]
    fig.legend(handles, ["malicious client", "honest clients"], loc="lower center", ncol=2, fontsize="small", frameon=False)
    fig.suptitle(f"attention weight of each client per round: {what}", fontsize="medium")
    fig.tight_layout(rect=(0, 0.1, 1, 0.93))
    return _save(fig, out, "attention_weights")
