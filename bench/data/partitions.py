"""How a task's training samples are split over clients: the partitions of NIID-Bench (Li et
al., 2022) and McMahan et al.'s shards. Each is a pure function of (labels, the task's
sample indices, its config, a generator seeded from the run seed and the task), so every
machine builds the same split.

* dirichlet (label skew): per class, proportions ~ Dir(alpha)
* label_quantity (#C = k): each client holds `classes_per_client` classes of each task
* quantity (quantity skew): client sizes ~ Dir(alpha), contents IID
* iid, shards
Feature-noise skew is not a split: `scenario.feature_noise` adds Gaussian noise of a
per-client level to the inputs (bench/runtime/base.py, seeded per run, task and client).
"""

from __future__ import annotations

import numpy as np

from bench.config import ScenarioConfig
from bench.errors import UserError


class ScenarioError(UserError, ValueError):
    """The scenario cannot be built from this config; the message says what to change."""


def dirichlet_partition(
    labels: np.ndarray, idx: np.ndarray, num_clients: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed split: per class, proportions ~ Dir(alpha); resampled until every client
    has at least `min_samples` (the classic NIID-Bench recipe, with its balancing cap). The
    number of attempts shrinks with the work of one (clients x classes), so an infeasible
    request fails in seconds, not minutes, and stays a pure function of its inputs."""
    n = len(idx)
    classes = np.unique(labels[idx])
    for _ in range(max(5, min(1000, 2_000_000 // (num_clients * len(classes))))):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            ic = rng.permutation(idx[labels[idx] == c])
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * np.array([len(part) < n / num_clients for part in parts])  # cap clients already full
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1 / num_clients)
            cuts = (np.cumsum(p) * len(ic)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(ic, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_samples:
            return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    raise ScenarioError(
        f"could not give each of {num_clients} clients >= {min_samples} samples with alpha={alpha} "
        f"from {n} samples; lower scenario.min_samples, raise alpha or use fewer clients"
    )


def iid_partition(idx: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(idx), num_clients)]


def shard_partition(
    labels: np.ndarray, idx: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut shards, deal them out."""
    by_label = idx[np.argsort(labels[idx], kind="stable")]
    shards = np.array_split(by_label, num_clients * shards_per_client)
    deal = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]


def label_quantity_partition(labels: np.ndarray, idx: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-Bench's #C=k: every client gets k distinct classes of the task (each class goes to
    at least one client while clients remain), and a class's samples are split evenly among
    the clients that hold it."""
    classes = np.unique(labels[idx])
    if k > len(classes):
        raise ScenarioError(f"scenario.classes_per_client={k} but a task has only {len(classes)} classes; lower it")
    held: list[list[int]] = []
    for i in range(num_clients):
        first = [int(classes[i % len(classes)])] if i < len(classes) else []  # cover every class first
        rest = [int(c) for c in rng.permutation(classes) if c not in first][: k - len(first)]
        held.append(first + rest)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        owners = [i for i, h in enumerate(held) if int(c) in h]
        if not owners:
            continue  # more classes than clients x k: this class is held by nobody (as in NIID-Bench)
        for owner, chunk in zip(owners, np.array_split(rng.permutation(idx[labels[idx] == c]), len(owners))):
            parts[owner].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def quantity_partition(idx: np.ndarray, num_clients: int, alpha: float, min_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-Bench's quantity skew: client sizes ~ Dir(alpha), contents IID; resampled until
    every client has at least `min_samples`."""
    for _ in range(1000):
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
        parts = np.split(rng.permutation(idx), cuts)
        if min(len(part) for part in parts) >= min_samples:
            return [np.sort(part) for part in parts]
    raise ScenarioError(
        f"could not give each of {num_clients} clients >= {min_samples} samples with alpha={alpha} "
        f"from {len(idx)} samples; lower scenario.min_samples, raise alpha or use fewer clients"
    )


def partition(cfg: ScenarioConfig, labels: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """One task's split, by `scenario.partition`."""
    if cfg.partition == "dirichlet":
        return dirichlet_partition(labels, idx, cfg.num_clients, cfg.alpha, cfg.min_samples, rng)
    if cfg.partition == "iid":
        return iid_partition(idx, cfg.num_clients, rng)
    if cfg.partition == "label_quantity":
        return label_quantity_partition(labels, idx, cfg.num_clients, cfg.classes_per_client, rng)
    if cfg.partition == "quantity":
        return quantity_partition(idx, cfg.num_clients, cfg.alpha, cfg.min_samples, rng)
    return shard_partition(labels, idx, cfg.num_clients, cfg.shards_per_client, rng)
