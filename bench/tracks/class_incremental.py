"""Federated class-incremental (and domain-incremental) classification: the first track.

Stages are the scenario's tasks (bench/data/scenario.py): each adds classes (or, with
`scenario.tasks_by: domain`, a domain of all classes), partitioned over the clients. The
server is evaluated on the test data of every task so far; at each task's last round the
per-task accuracies fill row t of the accuracy matrix R[t, j]. A run reports final and
average incremental accuracy, forgetting and backward transfer (bench/metrics.py), and
writes R as the `accuracy` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from bench.api import ServerHandle, TaskInfo
from bench.config import ExperimentConfig
from bench.data import Dataset, build_scenario
from bench.data.scenario import client_noise
from bench.metrics import average_incremental_accuracy, backward_transfer, final_accuracy, forgetting, task_accuracies
from bench.tracks.base import Stage, Track, register_track


@dataclass
class AccuracyRecord:
    """R[i, j]: accuracy on task j's test data after task i (NaN until measured); the
    accuracy on everything seen after each task."""

    R: np.ndarray
    seen_acc: np.ndarray


@register_track
class ClassIncremental(Track):
    name = "class_incremental"
    summary = "tasks of new classes (or domains) over clients; accuracy matrix, forgetting, BWT"
    extra_tables = {
        "accuracy": pa.schema([("method", pa.string()), ("after_task", pa.int64()), ("eval_task", pa.int64()), ("accuracy", pa.float64())])
    }
    summary_columns = (
        ("final_acc", pa.float64()),
        ("avg_acc", pa.float64()),
        ("forgetting", pa.float64()),
        ("bwt", pa.float64()),
    )
    metric_labels = {
        "final_acc": ("Final acc. (%)", True, 100, 1),
        "avg_acc": ("Avg. inc. acc. (%)", True, 100, 1),
        "forgetting": ("Forgetting (%)", False, 100, 1),
        "bwt": ("BWT (%)", True, 100, 1),
    }
    headline = ("final_acc", "avg_acc", "forgetting", "bwt")
    report_metrics = ("final_acc", "avg_acc", "forgetting")
    tune_metric = "final_acc"
    note = (
        "R[i,j] = accuracy on task j after task i. Final acc.: accuracy on all seen "
        "test samples after the last task; Avg. inc. acc.: mean over tasks of that accuracy after each task; "
        "Forgetting (Chaudhry): mean_{j<T} max_{l<T} R[l,j] - R[T,j]; BWT (GEM): mean_{j<T} R[T,j] - R[j,j]."
    )

    def __init__(self, cfg: ExperimentConfig, ds: Dataset, test_x: np.ndarray) -> None:
        super().__init__(cfg, ds, test_x)
        self.scenario = build_scenario(cfg.scenario, ds.train_y, ds.class_names, cfg.seed, ds.train_domain, ds.domain_names)
        self.test_task = self.scenario.test_tasks(ds.test_y, ds.test_domain)

    @property
    def num_stages(self) -> int:
        return self.scenario.num_tasks

    def stage(self, t: int) -> Stage:
        sc = self.scenario
        info = TaskInfo(t, sc.new_classes(t), sc.seen_classes(t), sc.client_classes(t, self.ds.train_y))
        return Stage(info, sc.client_indices[t], client_noise(sc, self.cfg.seed, t))

    def new_record(self) -> AccuracyRecord:
        T = self.num_stages
        return AccuracyRecord(np.full((T, T), np.nan), np.zeros(T))

    def evaluate(self, server: ServerHandle, t: int, kept: dict[int, dict[str, np.ndarray]]) -> tuple[float, list[float]]:
        """Accuracy on the test data of every task so far, and per task, from one predict call."""
        seen = (self.test_task >= 0) & (self.test_task <= t)
        x, y = np.asarray(self.test_x[seen]), self.ds.test_y[seen]
        return task_accuracies(server.predict(x), y, self.test_task[seen], self.num_stages)

    def end_stage(self, record: AccuracyRecord, t: int, headline: float, details: list[float]) -> None:
        record.R[t, : t + 1] = details[: t + 1]
        record.seen_acc[t] = headline

    def summarize(self, record: AccuracyRecord) -> dict[str, Any]:
        return {
            "final_acc": final_accuracy(record.seen_acc),
            "avg_acc": average_incremental_accuracy(record.seen_acc),
            "forgetting": forgetting(record.R),
            "bwt": backward_transfer(record.R),
        }

    def rows(self, record: AccuracyRecord) -> dict[str, list[dict[str, Any]]]:
        T = self.num_stages
        return {"accuracy": [{"after_task": i, "eval_task": j, "accuracy": float(record.R[i, j])} for i in range(T) for j in range(i + 1)]}
