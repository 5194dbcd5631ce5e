"""Parquet results: one file per (table, run), written atomically, `runs` last.

Layout: OUT/<table>/<run_id>.parquet, so `pyarrow.dataset.dataset("OUT/summary")` or
`pandas.read_parquet("OUT/summary")` loads a whole table. A run counts as complete only
when its `runs` row says so; it is written after every other table of that run, each file
via a temporary name and an atomic rename, so an interrupted sweep never leaves a half
file behind and a rerun overwrites (never duplicates) the pieces of an unfinished run.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from bench.api import Server, available_methods
from bench.errors import UserError
from bench.tracks import Track, available_tracks

if TYPE_CHECKING:  # pandas is imported where a frame is built, not by every reader of results
    pass

TS = pa.timestamp("us", tz="UTC")

#: the harness's tables; methods add tables and summary columns of their own (`schemas()`)
BASE_SCHEMAS: dict[str, pa.Schema] = {
    "runs": pa.schema(
        [
            ("run_id", pa.string()),
            ("sweep", pa.string()),
            ("method", pa.string()),
            ("dataset", pa.string()),
            ("alpha", pa.float64()),
            ("seed", pa.int64()),
            ("num_clients", pa.int64()),
            ("tasks", pa.string()),
            ("num_tasks", pa.int64()),
            ("rounds", pa.int64()),
            ("local_epochs", pa.int64()),
            ("partition", pa.string()),
            ("eval_split", pa.string()),  # test, or val (the held-out slice of data.val_fraction)
            ("aggregation", pa.string()),  # the aggregation rule (mean unless set)
            ("attack", pa.string()),  # "none", or kind and malicious client count, e.g. "sign_flip x1"
            ("malicious", pa.string()),  # JSON list of the malicious client ids
            ("backbone", pa.string()),
            ("executor", pa.string()),
            ("config", pa.string()),
            ("versions", pa.string()),
            ("git_sha", pa.string()),
            ("hardware", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("start_time", TS),
            ("end_time", TS),
            ("resumed_at_task", pa.int64()),  # the task an interrupted run resumed at (null: ran in one go)
        ]
    ),
    "rounds": pa.schema(
        [
            ("run_id", pa.string()),
            ("method", pa.string()),
            ("task", pa.int64()),
            ("round", pa.int64()),
            ("acc_seen", pa.float64()),
            ("loss", pa.float64()),
            ("wall_seconds", pa.float64()),
            ("client_seconds", pa.float64()),
            ("bytes_up", pa.int64()),
            ("bytes_down", pa.int64()),
            ("clients_used", pa.int64()),
            ("retries", pa.int64()),
            ("stats", pa.string()),  # JSON object of the method's Server.stats() (null when none)
            ("agg_shares", pa.string()),  # JSON {client id: share of the aggregate}, over the groups combined
            ("malicious_share", pa.float64()),  # the malicious clients' summed share (null without an attack)
            ("agg_fallbacks", pa.int64()),  # groups where the rule could not apply (the median stood in)
        ]
    ),
    "summary": pa.schema(
        [
            ("run_id", pa.string()),
            ("method", pa.string()),
            ("dataset", pa.string()),
            ("alpha", pa.float64()),
            ("seed", pa.int64()),
            ("num_tasks", pa.int64()),
            # the run's track's summary columns go here (class-incremental: final_acc ... bwt)
            ("wall_seconds", pa.float64()),
            ("gpu_seconds", pa.float64()),
            ("bytes_up", pa.int64()),
            ("bytes_down", pa.int64()),
        ]
    ),
}


def schemas() -> dict[str, pa.Schema]:
    """Every table's schema: the harness's; the summary widened by every registered track's
    and method's `summary_columns` (null in other tracks' and methods' rows, so one summary
    table holds them all; the tracks' columns before the costs); and each track's and
    method's `extra_tables` with a leading run_id. `runs` comes last: it is written last and
    marks a run complete."""
    return _schemas(tuple(available_tracks().values()), tuple(available_methods().values()))


@functools.cache
def _schemas(tracks: tuple[type[Track], ...], methods: tuple[type[Server], ...]) -> dict[str, pa.Schema]:
    base = list(BASE_SCHEMAS["summary"])
    cut = [f.name for f in base].index("wall_seconds")
    summary = base[:cut]
    for extender in tracks:
        summary += [pa.field(n, t) for n, t in extender.summary_columns if n not in {f.name for f in summary}]
    summary += base[cut:]
    for cls in methods:
        summary += [pa.field(n, t) for n, t in cls.summary_columns if n not in {f.name for f in summary}]
    out = {name: schema for name, schema in BASE_SCHEMAS.items() if name != "runs"}
    out["summary"] = pa.schema(summary)
    for cls in (*tracks, *methods):
        for name, columns in cls.extra_tables.items():
            schema = pa.schema([pa.field("run_id", pa.string()), *columns])
            if name in out and out[name] != schema:
                raise ValueError(f"{cls.name} declares table {name!r}, which another method or the harness declares differently")
            out[name] = schema
    out["runs"] = BASE_SCHEMAS["runs"]
    return out


class ResultsDirError(UserError, RuntimeError):
    """The output directory cannot be used; the message says why."""


def to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    schema = schemas()[name]
    return pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in rows], schema=schema)


class ResultWriter:
    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def check_writable(self) -> None:
        """Fail before any work if OUT cannot be created or written."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ResultsDirError(
                f"output directory {self.out} is not writable ({e.strerror}); pass --out to a writable directory"
            ) from None

    def path(self, table: str, run_id: str) -> Path:
        return self.out / table / f"{run_id}.parquet"

    def _write(self, table: str, run_id: str, data: pa.Table) -> None:
        dest = self.path(table, run_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        pq.write_table(data, tmp)
        os.replace(tmp, dest)

    def write_run(self, run_id: str, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Write every table of one run; `runs` goes last and marks the run complete."""
        for name in schemas():
            if name != "runs" and name in tables:
                self._write(name, run_id, to_table(name, tables[name]))
        self._write("runs", run_id, to_table("runs", tables["runs"]))

    def status(self, run_id: str) -> str | None:
        p = self.path("runs", run_id)
        if not p.exists():
            return None
        try:
            return pq.read_table(p, columns=["status"]).column("status")[0].as_py()
        except (pa.ArrowInvalid, OSError, IndexError):
            return None

    def is_complete(self, run_id: str) -> bool:
        return self.status(run_id) == "completed"


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A file written by an older version: columns it lacks become nulls, extra ones are dropped."""
    cols = [table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema) if table.schema != schema else table


class BadResultFile(UserError):
    pass


def read_table(out: Path | str, name: str, bad: list[Path] | None = None) -> pa.Table:
    """One table of a results directory, all runs concatenated (empty if none).

    A file that is not readable Parquet raises `BadResultFile` naming it; when the caller
    passes a `bad` list instead, the file is skipped and appended to it (nothing silent)."""
    folder = Path(out) / name
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    tables = []
    for f in files:
        try:
            tables.append(conform(pq.read_table(f), schemas()[name]))
        except (pa.ArrowException, OSError) as e:
            if bad is None:
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                raise BadResultFile(
                    f"{f} is not a readable Parquet file ({reason}); delete it (its run is redone by the same "
                    "`fedame-bench run`) or pass --skip-bad to report the rest"
                ) from None
            bad.append(f)
    return pa.concat_tables(tables) if tables else schemas()[name].empty_table()
