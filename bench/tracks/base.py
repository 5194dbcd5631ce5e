"""The track seam: what differs between kinds of federated experiment.

A track turns a dataset and a config into stages (a stage is what the server learns at its
start and which training samples each client holds during it), evaluates the server at the
end of rounds, and says what a finished run reports: its summary columns and its own
tables. Everything else (the runner's template loop, the executors, aggregation and attacks,
the wire ledger, checkpoints, results, sweep, report) is shared by every track.

A track is registered like a method (`@register_track`, or the `fedame_bench.tracks`
entry-point group) and chosen by the config's `track` key; a method says which tracks it
can run (`Server.tracks`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from bench.api import ServerHandle, TaskInfo
from bench.config import ConfigError, ExperimentConfig
from bench.data import Dataset


@dataclass(frozen=True)
class Stage:
    """One stage of a run: what the server learns as it starts, and each client's training
    samples (indices into the training set) with its feature noise, if any."""

    info: TaskInfo
    client_indices: tuple[np.ndarray, ...]
    noise: dict[int, tuple[float, int]] | None = None


class Track(ABC):
    """A kind of experiment: its stages, its evaluation, its results. Built once per run from
    the run's config, the dataset and the inputs the method sees at evaluation (features or
    images of the test split)."""

    #: the config's `track` value
    name: ClassVar[str]
    #: one line for the docs and errors
    summary: ClassVar[str]
    #: tables this track writes for every run (name -> columns; every row also gets run_id)
    extra_tables: ClassVar[dict[str, pa.Schema]] = {}
    #: columns this track adds to the summary table
    summary_columns: ClassVar[tuple[tuple[str, pa.DataType], ...]] = ()
    #: how `fedame-bench report` shows each summary column: (label with unit, higher is
    #: better, scale of the shown value, decimals)
    metric_labels: ClassVar[dict[str, tuple[str, bool, float, int]]] = {}
    #: the columns the sweep's summary table shows, and those a report shows unless told otherwise
    headline: ClassVar[tuple[str, ...]] = ()
    report_metrics: ClassVar[tuple[str, ...]] = ()
    #: the report's footnote: what the headline metrics mean
    note: ClassVar[str] = ""
    #: the summary column `fedame-bench tune` chooses by (a run scored on validation)
    tune_metric: ClassVar[str] = ""
    #: the protocol has its own validation split (no data.val_fraction slice is held out)
    own_validation: ClassVar[bool] = False

    #: the method's inputs of the training split (row-aligned with ds.train_y), set by the
    #: runner before the first stage: for tracks that evaluate on part of it (per-client validation)
    train_x: np.ndarray | None = None

    def __init__(self, cfg: ExperimentConfig, ds: Dataset, test_x: np.ndarray) -> None:
        self.cfg, self.ds, self.test_x = cfg, ds, test_x
        if self.own_validation and cfg.data.val_fraction > 0:
            raise ConfigError(
                f"the {self.name} track has its own validation data: set data.val_fraction to 0 (eval.split: val scores on it)"
            )

    @property
    @abstractmethod
    def num_stages(self) -> int: ...

    @abstractmethod
    def stage(self, t: int) -> Stage:
        """Stage `t` (the runner asks once, when the stage starts)."""

    def participants(self, t: int) -> list[int] | None:
        """The clients the rounds of stage `t` sample from (None: every client)."""
        return None

    def joiners(self, t: int) -> list[int]:
        """Clients that join at stage `t`'s last round: after its aggregation each trains once
        from the server's model (kept on its device, never aggregated), before the evaluation."""
        return []

    @abstractmethod
    def new_record(self) -> Any:
        """What the track keeps of a run while it goes (checkpointed after every stage)."""

    @abstractmethod
    def evaluate(self, server: ServerHandle, t: int, kept: dict[int, dict[str, np.ndarray]]) -> tuple[float, Any]:
        """(the headline number of the rounds table's `acc_seen`, the stage's details); `kept`
        is what each client keeps on its device (ClientUpdate.kept), for tracks whose
        evaluation is per client."""

    def observe(self, record: Any, t: int, r: int, headline: float, details: Any) -> None:
        """See every evaluation (round `r` of stage `t`), not only a stage's last: a track that
        reports at the round chosen on validation keeps them here."""

    @abstractmethod
    def end_stage(self, record: Any, t: int, headline: float, details: Any) -> None:
        """Keep the evaluation made at stage `t`'s last round in `record`."""

    @abstractmethod
    def summarize(self, record: Any) -> dict[str, Any]:
        """Values of `summary_columns` for a finished run."""

    def rows(self, record: Any) -> dict[str, list[dict[str, Any]]]:
        """A finished run's rows of `extra_tables` (run_id is added by the runner)."""
        return {}

    @classmethod
    def figures(cls, rounds: Any, extra: dict[str, Any], style: dict[str, dict]) -> dict[str, Any]:
        """`fedame-bench plot`'s figures of a sweep of this track (name -> matplotlib figure)
        from its rounds table (with alpha and seed) and its extra tables (pandas); `style`
        gives each method its marker and line. Class-incremental plots are bench/plot.py's own."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The runs table's description of the scenario (number of stages and their sizes)."""
        return {"num_tasks": self.num_stages}


_TRACKS: dict[str, type[Track]] = {}
ENTRY_POINT_GROUP = "fedame_bench.tracks"


def register_track(cls: type[Track]) -> type[Track]:
    if cls.name in _TRACKS and _TRACKS[cls.name] is not cls:
        raise ValueError(f"track name {cls.name!r} registered twice")
    _TRACKS[cls.name] = cls
    return cls


def available_tracks() -> dict[str, type[Track]]:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _TRACKS:
            ep.load()
    return dict(sorted(_TRACKS.items()))
