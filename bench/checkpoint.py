"""Task-level resume: a run's state at the end of each task, written atomically, so a run
killed in its ninth task restarts from its eighth, not from task 0.

What a run needs to go on is small and has no random state in it: clients are stateless
(`bench.api.Client`), and every random draw derives from (run seed, task, round, client),
so the server's state (`Server.state()`) plus what the driver has gathered so far (the
rounds rows, the accuracy matrix, the wire ledger: RunProgress; time spent) is all of it. A resumed run
writes the same tables as an uninterrupted one, apart from wall times.

Layout: OUT/checkpoints/<run_id>.pkl (a pickle: load only checkpoints you wrote). The
file is removed once the run's tables are written.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.wire import WireLedger

log = logging.getLogger(__name__)

FORMAT = 4  # bumped when the fields below change: an older checkpoint is then not used


@dataclass
class RunProgress:
    """What a run has gathered so far: its track's record, the rounds rows, GPU seconds and
    the wire ledger. Checkpointed after each task."""

    record: Any  # what the run's track keeps (class-incremental: the accuracy matrix)
    rounds_rows: list[dict[str, Any]] = field(default_factory=list)
    gpu_seconds: float = 0.0
    ledger: WireLedger = field(default_factory=WireLedger)  # bytes down: what clients do not hold yet (bench/wire.py)
    kept: dict[int, dict[str, Any]] = field(default_factory=dict)  # client -> what it keeps on its device (ClientUpdate.kept)


@dataclass
class RunCheckpoint:
    run_id: str
    next_task: int  # the first task still to run
    server_state: bytes  # Server.state() after the last completed task
    progress: RunProgress  # the track's record, rounds rows, GPU seconds, wire ledger
    elapsed: float  # wall seconds spent before the interruption
    started: datetime
    format: int = FORMAT


class CheckpointStore:
    """The checkpoints of one results directory."""

    def __init__(self, out: Path) -> None:
        self.folder = Path(out) / "checkpoints"
        self.unusable: list[str] = []  # checkpoints that could not be read (each one said)

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.pkl"

    def save(self, ckpt: RunCheckpoint) -> None:
        dest = self.path(ckpt.run_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(ckpt, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, dest)  # a kill mid-write leaves the previous task's checkpoint intact

    def load(self, run_id: str) -> RunCheckpoint | None:
        """The run's checkpoint, or None. One that cannot be used is said (logged and kept in
        `unusable`) and the run starts from task 0: never a silent restart."""
        p = self.path(run_id)
        if not p.exists():
            return None
        try:
            with open(p, "rb") as f:
                ckpt = pickle.load(f)
            ok = isinstance(ckpt, RunCheckpoint) and ckpt.format == FORMAT and ckpt.run_id == run_id
            why = "written by another version of fedame-bench"
        except Exception as e:  # truncated or foreign file: any unpickling error
            ok, why = False, f"unreadable ({type(e).__name__})"
        if not ok:
            log.warning("checkpoint %s is %s; the run starts again from task 0", p, why)
            self.unusable.append(str(p))
            return None
        return ckpt

    def drop(self, run_id: str) -> None:
        self.path(run_id).unlink(missing_ok=True)
