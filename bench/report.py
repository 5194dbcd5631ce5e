"""Paper tables from Parquet results alone: methods x settings, mean ± std over seeds.

The numbers in the table are exactly the numbers that were run: everything is read from
the `summary` and `runs` tables of one or more results directories. A cell whose runs are
not all complete (a sweep still running, or a failed run) is marked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import UserError
from bench.results import read_table
from bench.tracks import Track, available_tracks, get_track

METRICS = {
    # name: (label with unit, higher is better, scale of the shown value, decimals); each
    # track adds its own (Track.metric_labels)
    **{name: label for track in available_tracks().values() for name, label in track.metric_labels.items()},
    "wall_seconds": ("Wall s", False, 1, 1),
    "bytes_down": ("MB down", False, 1e-6, 1),  # what a deployment sends (bench/wire.py)
    "bytes_up": ("MB up", False, 1e-6, 1),
}
SETTING_COLUMNS = (
    "alpha",
    "dataset",
    "num_tasks",
    "num_clients",
    "partition",
    "rounds",
    "local_epochs",
    "backbone",
    "aggregation",
    "attack",
)
NOTE = "Mean ± std over seeds (n = seeds)."


class ReportError(UserError):
    pass


def load(dirs: list[Path], bad: list[Path] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Completed summaries joined with their run settings, and every run row (for status).
    With `bad` given, unreadable files are skipped and listed there (else they raise)."""
    summaries, runs = [], []
    for d in dirs:
        if not Path(d).is_dir():
            raise ReportError(f"no results directory {d}; pass the --out folder of a `fedame-bench run`")
        summaries.append(read_table(d, "summary", bad).to_pandas())
        runs.append(read_table(d, "runs", bad).to_pandas())
    summary, run_rows = pd.concat(summaries, ignore_index=True), pd.concat(runs, ignore_index=True)
    if run_rows.empty:
        raise ReportError(f"no runs found in {', '.join(map(str, dirs))}; is this a results directory?")
    settings = run_rows[["run_id", *[c for c in SETTING_COLUMNS if c not in ("alpha", "dataset", "num_tasks")]]]
    summary = summary.merge(settings, on="run_id", how="left").drop_duplicates("run_id")
    # runs written before aggregation rules and attacks existed used the mean, unattacked
    for frame in (summary, run_rows):
        frame["aggregation"] = frame["aggregation"].fillna("mean")
        frame["attack"] = frame["attack"].fillna("none")
    return summary, run_rows.drop_duplicates("run_id", keep="last")


@dataclass
class Cell:
    mean: float
    std: float
    n: int
    complete: bool


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def identity(config_json: str | None, method: str, by: list[str]) -> dict[str, str] | None:
    """What makes a run's numbers, minus the seed and the --by columns: runs whose identities
    differ are not seeds of one setting."""
    if not isinstance(config_json, str):
        return None  # written without its config: nothing to compare
    cfg = json.loads(config_json)
    for key in ("runtime", "sweep", "name", "cache_dir", "seed"):
        cfg.pop(key, None)
    cfg.get("data", {}).pop("root", None)
    if "alpha" in by:
        cfg.get("scenario", {}).pop("alpha", None)
    # the defaults (mean, no attack) are what runs written before these settings existed did
    if "aggregation" in by or cfg.get("aggregation", {}).get("rule", "mean") == "mean":
        cfg.pop("aggregation", None)
    if "attack" in by or cfg.get("scenario", {}).get("attack", {}).get("kind", "none") == "none":
        cfg.get("scenario", {}).pop("attack", None)
    cfg["methods"] = {method: cfg.get("methods", {}).get(method, {})}
    return _flat(cfg)


def check_mergeable(runs: pd.DataFrame, by: list[str]) -> None:
    """Refuse (one line) to average runs of one method and setting whose configs differ in
    anything but the seed, naming the fields and the --by that would separate them."""
    if "config" not in runs.columns:
        return
    for key, group in runs.groupby(["method", *by], dropna=False):
        ids = [i for i in (identity(c, key[0], by) for c in group["config"]) if i is not None]
        first = ids[0] if ids else None
        other = next((i for i in ids if i != first), None)
        if other is None:
            continue
        fields = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        columns = [c for c in SETTING_COLUMNS if c in group.columns and c not in by and group[c].nunique(dropna=False) > 1]
        hint = f"add --by {','.join([*by, *columns])}" if columns else "report them from separate results directories"
        shown = ", ".join(fields[:6]) + (f" (+{len(fields) - 6} more)" if len(fields) > 6 else "")
        raise ReportError(f"{key[0]} runs that would be averaged as seeds differ in {shown}; {hint}")


def aggregate(summary: pd.DataFrame, runs: pd.DataFrame, metrics: list[str], by: list[str]) -> dict:
    """{(metric, setting tuple): {method: Cell}}, plus the ordered settings and methods."""
    for m in metrics:
        if m not in METRICS:
            raise ReportError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    for b in by:
        if b not in runs.columns:
            raise ReportError(f"cannot group by {b!r}; choose from {', '.join(c for c in SETTING_COLUMNS)}")
    check_mergeable(runs, by)
    settings = sorted({tuple(r) for r in runs[by].itertuples(index=False)}) if by else [()]
    methods = sorted(runs["method"].unique())
    cells: dict = {}
    for metric in metrics:
        for s in settings:
            col = {}
            for method in methods:
                sel_runs = runs[(runs.method == method) & _match(runs, by, s)]
                sel = summary[(summary.method == method) & _match(summary, by, s)]
                vals = sel[metric].dropna().to_numpy(dtype=float)
                if len(sel_runs) == 0:
                    continue
                complete = bool((sel_runs.status == "completed").all()) and len(vals) == len(sel_runs)
                std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                col[method] = Cell(float(np.mean(vals)) if len(vals) else float("nan"), std, len(vals), complete)
            cells[(metric, s)] = col
    # a cell with fewer seeds than the fullest cell is still running (or lost a run)
    most = max((c.n for col in cells.values() for c in col.values()), default=0)
    for col in cells.values():
        for c in col.values():
            c.complete = c.complete and c.n == most
    return {"cells": cells, "settings": settings, "methods": methods}


def _match(df: pd.DataFrame, by: list[str], values: tuple) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for b, v in zip(by, values):
        mask &= df[b] == v
    return mask


def best_methods(col: dict[str, Cell], metric: str) -> set[str]:
    higher = METRICS[metric][1]
    vals = {m: c.mean for m, c in col.items() if not np.isnan(c.mean)}
    if not vals:
        return set()
    target = max(vals.values()) if higher else min(vals.values())
    return {m for m, v in vals.items() if np.isclose(v, target)}


def _fmt(c: Cell, metric: str) -> str:
    if np.isnan(c.mean):
        return "–"
    _, _, scale, digits = METRICS[metric]
    return f"{c.mean * scale:.{digits}f} ± {c.std * scale:.{digits}f} ({c.n})"


def _header(metric: str, by: list[str], s: tuple) -> str:
    label = METRICS[metric][0]
    return " ".join([label, *(f"{b}={v:g}" if isinstance(v, float) else f"{b}={v}" for b, v in zip(by, s))]).strip()


def render(agg: dict, by: list[str], fmt: str, note: str = NOTE) -> str:
    cols = list(agg["cells"])
    headers = [_header(m, by, s) for m, s in cols]
    rows = []
    any_incomplete = False
    for method in agg["methods"]:
        row = []
        for key in cols:
            col = agg["cells"][key]
            c = col.get(method)
            if c is None:
                row.append(("–", False, False))
                continue
            any_incomplete |= not c.complete
            row.append((_fmt(c, key[0]), method in best_methods(col, key[0]), not c.complete))
        rows.append((method, row))
    if fmt == "markdown":
        out = ["| method | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
        for method, row in rows:
            cells = [(f"**{t}**" if b else t) + (" †" if inc else "") for t, b, inc in row]
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out += ["", note + (" † incomplete: not every run of this cell has finished." if any_incomplete else "")]
        return "\n".join(out)
    if fmt == "latex":
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")
        out = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "c" * len(headers) + "}", r"\toprule"]
        out.append("Method & " + " & ".join(esc(h) for h in headers) + r" \\")
        out.append(r"\midrule")
        for method, row in rows:
            cells = [(r"\textbf{" + esc(t) + "}" if b else esc(t)) + (r"$^\dagger$" if inc else "") for t, b, inc in row]
            out.append(esc(method) + " & " + " & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        out.append(r"\caption{" + esc(note) + (r" $^\dagger$ incomplete." if any_incomplete else "") + "}")
        out.append(r"\end{table}")
        return "\n".join(out)
    if fmt == "csv":
        lines = ["method," + ",".join(by) + ",metric,mean,std,n,complete"]
        for (metric, s), col in agg["cells"].items():
            for method, c in col.items():
                lines.append(",".join([method, *map(str, s), metric, f"{c.mean:.6g}", f"{c.std:.6g}", str(c.n), str(c.complete)]))
        return "\n".join(lines)
    raise ReportError(f"unknown format {fmt!r}; use markdown, latex or csv")


def report(
    dirs: list[Path], fmt: str = "markdown", metrics: list[str] | None = None, by: list[str] | None = None, bad: list[Path] | None = None
) -> str:
    summary, runs = load(dirs, bad)
    tracks = tracks_of(runs)
    metrics = metrics or [m for t in tracks for m in t.report_metrics]
    by = ["alpha"] if by is None else by
    return render(aggregate(summary, runs, metrics, by), by, fmt, " ".join([NOTE, *(t.note for t in tracks)]))


def tracks_of(runs: pd.DataFrame) -> list[type[Track]]:
    """The tracks the runs belong to (from their configs; runs written before tracks existed
    are class-incremental)."""
    names = {json.loads(c).get("track", "class_incremental") if isinstance(c, str) else "class_incremental" for c in runs["config"]}
    return [get_track(n) for n in sorted(names)]
