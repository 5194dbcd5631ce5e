"""Frozen backbone and the on-disk feature cache.

The backbone is frozen, so features are computed once per (dataset content, split,
architecture, variant, weights digest, transform) and cached as .npy files that are
memory-mapped on load. Writes go to a temporary file and are renamed into place; a JSON
sidecar holds the checksum, so a partial or corrupt cache file is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.config import BackboneConfig, where
from bench.data import Dataset
from bench.errors import UserError
from bench.progress import progress_bar

log = logging.getLogger(__name__)


class BackboneError(UserError, RuntimeError):
    """The backbone weights asked for cannot be had; the message lists the alternatives."""


def best_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resnet18(variant: str, num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18, or its CIFAR variant (3x3 stride-1 stem, no max-pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if variant == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.exists():
        try:
            socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
        except OSError:
            raise BackboneError(
                f"ImageNet ResNet-18 weights are not cached ({cached}) and there is no network to download them; "
                "use backbone.weights=none, a path to a state dict (e.g. one from `fedame-bench pretrain-backbone`), "
                "or set TORCH_HOME to a directory whose hub/checkpoints holds resnet18-f37072fd.pth"
            ) from None
    return weights.get_state_dict(progress=True)


def weights_digest(cfg: BackboneConfig) -> str:
    """What identifies the backbone's weights in the cache key (a file's content for a path)."""
    if cfg.weights == "none":
        return "random-init-seed0"
    if cfg.weights == "imagenet":
        return "imagenet1k-v1"
    path = Path(cfg.weights).expanduser()
    if not path.exists():
        raise BackboneError(f"backbone.weights: no file {where(path)}; give imagenet, none, or an existing state dict path")
    return file_sha256(path)[:16]


def load_backbone(cfg: BackboneConfig) -> tuple[nn.Module, str]:
    """The frozen feature extractor (fc removed) and a digest of its weights."""
    with torch.random.fork_rng():  # a seeded init, so weights=none is the same network everywhere
        torch.manual_seed(0)
        model = resnet18(cfg.variant)
    digest = weights_digest(cfg)
    if cfg.weights == "imagenet":
        if cfg.variant != "torchvision":
            raise BackboneError("ImageNet weights exist only for backbone.variant=torchvision")
        model.load_state_dict(_imagenet_state_dict())
    elif cfg.weights != "none":
        path = Path(cfg.weights).expanduser()
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch: usually the stem of the other variant
            raise BackboneError(
                f"backbone.weights {path} does not fit resnet18 variant={cfg.variant!r} "
                f"({str(e).splitlines()[1].strip()}); check backbone.variant (torchvision | cifar)"
            ) from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise BackboneError(
                f"backbone.weights {path} does not fit resnet18 variant={cfg.variant!r} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check backbone.variant"
            )
    model.fc = nn.Identity()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, digest


def preprocess(images: np.ndarray, cfg: BackboneConfig, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW at the configured input size."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != cfg.input_size:
        x = nn.functional.interpolate(x, size=cfg.input_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract(model: nn.Module, images: np.ndarray, cfg: BackboneConfig, out: np.ndarray, label: str) -> None:
    device = best_device(cfg.device)
    model = model.to(device)
    with progress_bar() as bar:
        job = bar.add_task(f"features {label} ({device.type})", total=len(images))
        for a in range(0, len(images), cfg.batch_size):
            b = min(a + cfg.batch_size, len(images))
            out[a:b] = model(preprocess(images[a:b], cfg, device)).float().cpu().numpy()
            bar.advance(job, b - a)


class FeatureStore:
    """Serves frozen-backbone features (cached) and raw images for one dataset."""

    def __init__(self, dataset: Dataset, cfg: BackboneConfig, cache_dir: Path) -> None:
        self.dataset = dataset
        self.cfg = cfg
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
        return self.dataset.train_x if split == "train" else self.dataset.test_x

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
