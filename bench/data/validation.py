"""The validation protocol: a seeded, per-class slice of the training data held out of training.

Why: every default of every method is chosen on data the reported tables never score
(docs/results.md, "Validation protocol"). With `data.val_fraction` > 0 the slice is held out
of training whichever split a run is evaluated on, so a run scored on `val` (`eval.split:
val`, what `fedame-bench tune` uses) and the one scored on `test` train on the same samples.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bench.data.base import DataError, Dataset
from bench.seeds import derive_seed


def validation_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted training indices of the slice: `fraction` of each class (rounded, at least one
    sample of a class with two or more), chosen by a generator derived from `seed`."""
    rng = np.random.default_rng(derive_seed(seed, "validation"))
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        if n > 0:
            picked.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _take(x: np.ndarray, idx: np.ndarray, dropped: bool) -> np.ndarray:
    """Rows `idx` of `x`; pixels dropped by Dataset.without_images stay a broadcast, not a copy."""
    if dropped and x.ndim > 1 and x.strides[0] == 0:
        return np.broadcast_to(np.zeros((), x.dtype), (len(idx), *x.shape[1:]))
    return np.asarray(x[idx])


def held_out(ds: Dataset, fraction: float, split: str, seed: int) -> tuple[Dataset, np.ndarray | None, np.ndarray | None]:
    """(the dataset a run sees, the training rows it keeps, the validation rows): without a
    slice `ds` as it is (and None, None); with one, its training data without the slice and,
    for `split` "val", the slice as its evaluation data. A dataset with its own validation
    split (`Dataset.val_y`) is returned as it is: its track evaluates on that split."""
    if ds.val_y is not None:
        if fraction > 0:
            raise DataError(f"{ds.name} has its own validation split: set data.val_fraction to 0 (eval.split: val scores on it)")
        return ds, None, None
    if fraction <= 0:
        if split == "val":
            raise DataError("eval.split: val needs a validation slice; set data.val_fraction (e.g. 0.1)")
        return ds, None, None
    val = validation_indices(ds.train_y, fraction, seed)
    keep = np.setdiff1d(np.arange(len(ds.train_y)), val)
    domain, dropped = ds.train_domain, ds.images_dropped
    seen = replace(
        ds, train_x=_take(ds.train_x, keep, dropped), train_y=ds.train_y[keep], train_domain=None if domain is None else domain[keep]
    )
    if split == "val":
        seen = replace(
            seen, test_x=_take(ds.train_x, val, dropped), test_y=ds.train_y[val], test_domain=None if domain is None else domain[val]
        )
    return seen, keep, val


def with_validation(
    ds: Dataset, train_in: np.ndarray, test_in: np.ndarray, fraction: float, split: str, seed: int
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """`held_out` with the method's inputs of the two splits (features or images, row-aligned
    with `ds`): (the dataset the run sees, its training inputs, its evaluation inputs)."""
    seen, keep, val = held_out(ds, fraction, split, seed)
    if keep is None or val is None:
        return ds, train_in, test_in
    return seen, _take(train_in, keep, False), _take(train_in, val, False) if split == "val" else test_in
