"""FedDMMR's local dynamic memory and FedMem's prototypes.

The memory is what a client keeps on its device (ClientUpdate.kept): item ids with the
surprise they were written with, oldest first. A training item is written when its
surprise, 1 - sigmoid(positive score - mean negative score) (the probability the model
does not rank it above the negatives), reaches the threshold; an item written again moves
to the newest place; beyond `capacity` the oldest leave. The experts read the `top_k`
entries of highest surprise, through the items' features (public catalogue data).

Prototypes: a client summarises its memory's features by a local k-means and sends only the
centres (and their sizes); the server clusters every centre it receives into
`num_memory_prototypes` global prototypes, which go back to every client as memory slots.
"""

from __future__ import annotations

import numpy as np

EMPTY = {"mem_items": np.zeros(0, np.int64), "mem_surprise": np.zeros(0, np.float32)}


def write(
    kept: dict[str, np.ndarray] | None, items: np.ndarray, surprise: np.ndarray, threshold: float, capacity: int
) -> dict[str, np.ndarray]:
    """The memory after writing `items` (in time order) whose surprise reaches `threshold`."""
    kept = kept or EMPTY
    entries = dict(zip(kept["mem_items"].tolist(), kept["mem_surprise"].tolist()))  # insertion order = age
    for item, s in zip(items.tolist(), surprise.tolist()):
        if s >= threshold:
            entries.pop(item, None)
            entries[item] = s
    pairs = list(entries.items())[-capacity:]
    return {"mem_items": np.array([p[0] for p in pairs], np.int64), "mem_surprise": np.array([p[1] for p in pairs], np.float32)}


def read(kept: dict[str, np.ndarray] | None, top_k: int) -> np.ndarray:
    """The ids of the `top_k` entries of highest surprise (ties: the newer first)."""
    if not kept or len(kept["mem_items"]) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((-np.arange(len(kept["mem_items"])), -kept["mem_surprise"]))
    return kept["mem_items"][order[:top_k]]


def kmeans(
    x: np.ndarray, k: int, weights: np.ndarray, rng: np.random.Generator, init: np.ndarray | None = None, iters: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-means (Lloyd): (centres, the weight each holds). Starts from `init` when it
    has k rows, else from k distinct rows of `x` drawn by `rng`; an empty cluster keeps its
    centre. k is capped at the number of rows."""
    k = min(k, len(x))
    centres = init.copy() if init is not None and len(init) == k else x[rng.choice(len(x), size=k, replace=False)].copy()
    for _ in range(iters):
        assign = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        new = centres.copy()
        for c in range(k):
            w = weights[assign == c]
            if w.sum() > 0:
                new[c] = (x[assign == c] * w[:, None]).sum(0) / w.sum()
        if np.allclose(new, centres):
            break
        centres = new
    assign = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    return centres.astype(np.float32), np.bincount(assign, weights=weights, minlength=k).astype(np.float32)
