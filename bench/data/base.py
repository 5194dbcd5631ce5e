"""A dataset as plain arrays, and the error for data that is not there: what every loader returns."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from bench.errors import UserError


class DataError(UserError, RuntimeError):
    """Data the user asked for is not there; the message says where it was looked for."""


@dataclass(frozen=True)
class Dataset:
    name: str
    class_names: tuple[str, ...]
    train_x: np.ndarray  # uint8, N x H x W x 3
    train_y: np.ndarray  # int64, N
    test_x: np.ndarray
    test_y: np.ndarray
    superclasses: tuple[int, ...] | None = None  # coarse label of each fine class
    superclass_names: tuple[str, ...] | None = None
    train_domain: np.ndarray | None = None  # domain id of each sample (image folders with data.domains)
    test_domain: np.ndarray | None = None
    domain_names: tuple[str, ...] | None = None
    # a dataset with its own validation split (sequential recommendation: each user's
    # second-to-last item, aligned with test_x); data.val_fraction does not apply to it
    val_y: np.ndarray | None = None
    dropped: int = 0  # units the loader could not use (users with too few interactions), counted
    images_dropped: bool = False  # without_images(): train_x/test_x keep their shapes, not their pixels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def without_images(self) -> Dataset:
        """The same dataset without its pixels (shapes kept): once a sweep of feature methods has
        its features cached, the images are only memory (CIFAR-100: 184 MB in the driver)."""

        def empty(x: np.ndarray) -> np.ndarray:
            return np.broadcast_to(np.zeros((), np.uint8), x.shape)

        return replace(self, train_x=empty(self.train_x), test_x=empty(self.test_x), images_dropped=True)

    def digest(self, split: str) -> str:
        """Content digest of one split (images and labels): the feature cache's data key."""
        if self.images_dropped:
            raise RuntimeError("the dataset's images were dropped (Dataset.without_images); digest before dropping them")
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        h = hashlib.sha256(f"{self.name}:{split}:{x.shape}".encode())
        h.update(np.ascontiguousarray(x).data)
        h.update(np.ascontiguousarray(y).data)
        return h.hexdigest()[:16]
