"""The sample-weighted mean of client arrays: the default aggregation rule, and the one
parameter-averaging methods use for groups only some clients hold."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bench.api import ClientUpdate


def weighted_average(
    updates: list[ClientUpdate], keys: Iterable[str] | None = None, weights: list[float] | None = None
) -> dict[str, np.ndarray]:
    """Weighted mean of the named arrays over the updates that carry them; the weights are
    the updates' sample counts unless given (e.g. samples that trained one expert)."""
    keys = set(keys) if keys is not None else set().union(*(u.arrays for u in updates))
    weights = [float(u.num_samples) for u in updates] if weights is None else [float(w) for w in weights]
    out: dict[str, np.ndarray] = {}
    for k in sorted(keys):
        holders = [(u, w) for u, w in zip(updates, weights) if k in u.arrays and w > 0]
        if not holders:
            continue
        w = np.array([w for _, w in holders], dtype=np.float64)
        out[k] = _weighted_sum([u.arrays[k] for u, _ in holders], w / w.sum())
    return out


_CHUNK = 1 << 15


def _weighted_sum(arrays: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """sum_i w_i * arrays[i] in float64, cast back to the arrays' dtype. Computed over column
    blocks through one small reused buffer: the same dot products as stacking everything
    (identical bits) without allocating a float64 copy of all updates at once, whose page
    faults would dominate a wide head's aggregation."""
    flat = [a.reshape(-1) for a in arrays]
    n = flat[0].size
    out = np.empty(n, dtype=arrays[0].dtype)
    buf = np.empty((len(flat), min(_CHUNK, n)), dtype=np.float64)
    for a in range(0, n, _CHUNK):
        b = min(a + _CHUNK, n)
        block = buf if b - a == buf.shape[1] else buf[:, : b - a].copy()  # the last block: contiguous too
        for i, f in enumerate(flat):
            block[i] = f[a:b]
        out[a:b] = w @ block
    return out.reshape(arrays[0].shape)
