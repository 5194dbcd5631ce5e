"""The on-disk feature cache.

The backbone is frozen, so features are computed once per (dataset content, split,
backbone, weights digest, preprocessing) and cached as .npy files that are memory-mapped on
load. Writes go to a temporary file and are renamed into place; a JSON sidecar holds the
checksum, so a partial or corrupt cache file is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.config import BackboneConfig
from bench.data import Dataset
from bench.features.backbones import extract, file_sha256, load_backbone, preprocess, preprocessing, weights_digest

log = logging.getLogger(__name__)


class FeatureStore:
    """Serves frozen-backbone features (cached) and raw images for one dataset."""

    def __init__(self, dataset: Dataset, cfg: BackboneConfig, cache_dir: Path) -> None:
        self.dataset = dataset
        self.cfg = preprocessing(cfg)  # input size and normalisation: the model's own unless the config sets them
        self.dir = cache_dir / "features"
        self._model: nn.Module | None = None
        self._weights_digest: str | None = None
        self._keys: dict[str, str] = {}
        self._loaded: dict[str, np.ndarray] = {}  # splits already validated in this process

    def _backbone(self) -> nn.Module:
        if self._model is None:
            self._model, self._weights_digest = load_backbone(self.cfg)
        return self._model

    def weights_digest(self) -> str:
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.cfg)
        return self._weights_digest

    def key(self, split: str) -> str:
        """Digest of (data content, split, backbone, weights, transform); hashed once per split."""
        if split in self._keys:
            return self._keys[split]
        ident = {
            "dataset": self.dataset.name,
            "split": split,
            "data": self.dataset.digest(split),
            "arch": self.cfg.arch,
            "variant": self.cfg.variant,
            "weights": self.weights_digest(),
            "input_size": self.cfg.input_size,
            "mean": list(self.cfg.mean),
            "std": list(self.cfg.std),
        }
        self._keys[split] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        return self._keys[split]

    def paths(self, split: str) -> tuple[Path, Path]:
        k = self.key(split)
        return self.dir / f"{self.dataset.name}-{split}-{k}.npy", self.dir / f"{self.dataset.name}-{split}-{k}.json"

    def _valid(self, npy: Path, meta: Path) -> bool:
        if not (npy.exists() and meta.exists()):
            return False
        try:
            info = json.loads(meta.read_text())
            return npy.stat().st_size == info["bytes"] and file_sha256(npy) == info["sha256"]
        except (ValueError, KeyError, OSError):
            return False

    def features(self, split: str) -> np.ndarray:
        """Features of a split (memory-mapped, read-only), extracting them on a cache miss.
        The checksum is verified once per process; every run of a sweep reuses the mapping."""
        if split not in self._loaded:
            npy, meta = self.paths(split)
            if not self._valid(npy, meta):
                if npy.exists():
                    log.warning("feature cache %s is incomplete or corrupt; rebuilding", npy.name)
                self._build(split, npy, meta)
            self._loaded[split] = np.load(npy, mmap_mode="r")
        return self._loaded[split]

    def images(self, split: str) -> np.ndarray:
        if self.dataset.images_dropped:
            raise RuntimeError("the dataset's images were dropped (a sweep of feature methods); keep them for image methods")
        return self.dataset.train_x if split == "train" else self.dataset.test_x

    def drop_images(self) -> None:
        """Keep the features only (their cache keys, already computed, stay valid)."""
        for split in ("train", "test"):
            self.key(split)
        self.dataset = self.dataset.without_images()

    def _build(self, split: str, npy: Path, meta: Path) -> None:
        model = self._backbone()
        images = self.images(split)
        with torch.no_grad():
            dim = model(preprocess(images[:1], self.cfg, torch.device("cpu"))).shape[1]
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(images), dim))
        try:
            extract(model, images, self.cfg, out, f"{self.dataset.name}/{split}")
            out.flush()
            del out
            info = {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp), "shape": [len(images), dim]}
            os.replace(tmp, npy)
            tmp_meta = meta.with_suffix(f".tmp{os.getpid()}")
            tmp_meta.write_text(json.dumps(info))
            os.replace(tmp_meta, meta)
        finally:
            tmp.unlink(missing_ok=True)
