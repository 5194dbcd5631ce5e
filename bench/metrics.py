"""FCIL metrics, exactly as DESIGN.md defines them, and reading a rounds table's stats column.

R[i, j] is the accuracy on task j's test data after training task i (NaN for j > i).
`seen_acc[i]` is the sample-weighted accuracy on all test samples seen after task i.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def final_accuracy(seen_acc: np.ndarray) -> float:
    """Accuracy on all seen test samples after the last task."""
    return float(seen_acc[-1])


def average_incremental_accuracy(seen_acc: np.ndarray) -> float:
    """Mean over tasks of the all-seen accuracy after each task."""
    return float(np.mean(seen_acc))


def forgetting(R: np.ndarray) -> float:
    """Chaudhry et al.: mean over j < T of max_{l<T} R[l, j] - R[T, j]; NaN with one task."""
    T = R.shape[0] - 1
    if T < 1:
        return float("nan")
    return float(np.mean([np.max(R[:T, j][j:]) - R[T, j] for j in range(T)]))


def backward_transfer(R: np.ndarray) -> float:
    """GEM's BWT: mean over j < T of R[T, j] - R[j, j]; NaN with one task."""
    T = R.shape[0] - 1
    if T < 1:
        return float("nan")
    return float(np.mean([R[T, j] - R[j, j] for j in range(T)]))


def task_accuracies(pred: np.ndarray, y: np.ndarray, tasks: np.ndarray, n_tasks: int) -> tuple[float, list[float]]:
    """All-seen accuracy and per-task accuracies from one batch of predictions; `tasks` is the
    task of each sample (its class's task, or in a domain-incremental scenario its domain's)."""
    correct = pred == y
    per_task = [float(correct[tasks == j].mean()) if np.any(tasks == j) else float("nan") for j in range(n_tasks)]
    return float(correct.mean()), per_task


def stats_column(rounds: Any, key: str) -> Any:
    """One value of the `stats` JSON column of a rounds frame (pandas; NaN where absent)."""
    import json

    import pandas as pd

    return pd.to_numeric(rounds["stats"].map(lambda s: json.loads(s).get(key) if isinstance(s, str) else None), errors="coerce")
