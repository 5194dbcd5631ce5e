"""Shared fixtures. Everything here is offline: generated CIFAR-format fixtures, the
synthetic dataset, random backbones; the real CIFAR-100 only in tests marked slow."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pickle
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets the session's own cache dir, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("FEDAME_CACHE_DIR", str(cache))
    monkeypatch.delenv("FEDAME_DATA_DIR", raising=False)
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)


def write_cifar_fixture(root: Path, name: str, per_class_train: int = 6, per_class_test: int = 3, seed: int = 0) -> Path:
    """A tiny dataset in torchvision's on-disk CIFAR format (same keys, same layout)."""
    rng = np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100

    def batch(n_per: int) -> tuple[np.ndarray, list[int]]:
        y = np.repeat(np.arange(k), n_per)
        x = rng.integers(0, 256, size=(len(y), 3 * 32 * 32), dtype=np.uint8)
        return x, y.tolist()

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": names}, f)
        for i in range(1, 6):
            x, y = batch(per_class_train)
            with open(folder / f"data_batch_{i}", "wb") as f:
                pickle.dump({"data": x, "labels": y}, f)
        x, y = batch(per_class_test)
        with open(folder / "test_batch", "wb") as f:
            pickle.dump({"data": x, "labels": y}, f)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        fine = [f"fine{i}" for i in range(100)]
        coarse = [f"coarse{i}" for i in range(20)]
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": fine, "coarse_label_names": coarse}, f)
        for split, n in (("train", per_class_train), ("test", per_class_test)):
            x, y = batch(n)
            with open(folder / split, "wb") as f:
                pickle.dump({"data": x, "fine_labels": y, "coarse_labels": [c // 5 for c in y]}, f)
    return root


@pytest.fixture
def cifar_root(tmp_path):
    def make(name: str, **kw) -> Path:
        return write_cifar_fixture(tmp_path / f"data-{name}", name, **kw)

    return make


def requires_shared_data():
    return pytest.mark.skipif(not (SHARED_DATA / "cifar-100-python" / "train").exists(), reason="../shared/data absent")


def write_image_folder(
    root: Path, layout: str = "split", classes: int = 6, train: int = 12, test: int = 4, size: int = 40, seed: int = 0
) -> Path:
    """Small PNG folders: "split" (ROOT/train/<class>, ROOT/test/<class>), "pool" (ROOT/<class>)
    or "tiny" (Tiny-ImageNet: train/<wnid>/images, val/images + val_annotations.txt, words.txt).
    Each class is a coloured 4x4 pattern plus noise, the same pattern in every split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = rng.uniform(0, 255, (classes, 4, 4, 3))
    names = [f"n0{1000 + c}" if layout == "tiny" else f"class_{c}" for c in range(classes)]

    def image(c: int) -> Image.Image:
        x = np.kron(bases[c], np.ones((size // 4, size // 4, 1))) + rng.normal(0, 30, (size, size, 3))
        return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))

    for c, name in enumerate(names):
        for split, n in (("train", train), ("test", test)):
            if layout == "split":
                folder = root / split / name
            elif layout == "pool":
                folder = root / name
            elif split == "train":
                folder = root / "train" / name / "images"
            else:
                folder = root / "val" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                fname = f"{name}_{split}_{i}.png"
                image(c).save(folder / fname)
                if layout == "tiny" and split == "test":
                    with open(root / "val" / "val_annotations.txt", "a") as f:
                        f.write(f"{fname}\t{name}\t0\t0\t{size}\t{size}\n")
    if layout == "tiny":
        (root / "words.txt").write_text("".join(f"{n}\tthing {c}, other name\n" for c, n in enumerate(names)))
    return root


def write_tiny_hf_vision(root: Path, kind: str, image_size: int = 32) -> Path:
    """A tiny randomly initialised Hugging Face vision model and its image processor, saved
    to a folder (`backbone.arch: hf:<folder>`): vit, clip (a CLIP vision tower) or dinov2."""
    import torch
    from transformers import (
        BitImageProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=image_size, patch_size=8)
    torch.manual_seed(0)
    if kind == "vit":
        model, proc = ViTModel(ViTConfig(**small)), ViTImageProcessor(size={"height": image_size, "width": image_size})
    elif kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**small))
        proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    else:
        model = Dinov2Model(Dinov2Config(**small))
        proc = BitImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    model.save_pretrained(root)
    proc.save_pretrained(root)
    return root


def write_domain_folders(root: Path, domains: int = 3, classes: int = 4, train: int = 10, test: int = 4, size: int = 32) -> Path:
    """ROOT/<domain>/train/<class>/ and ROOT/<domain>/test/<class>/: every domain holds every
    class, each domain with its own colour shift (a domain-incremental fixture)."""
    for d in range(domains):
        write_image_folder(root / f"domain_{d}", "split", classes=classes, train=train, test=test, size=size, seed=100 + d)
    return root


@pytest.fixture(scope="session")
def cluster():
    """One Ray cluster for the whole session, on loopback: a head node (2 CPUs, 2 logical GPUs)
    that multi-node tests grow with worker nodes and shrink again (`ray.cluster_utils.Cluster`:
    real raylets). Started by the first test that asks for it."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 2,
            "node_ip_address": "127.0.0.1",
            "object_store_memory": 1 << 30,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": 0,
            "_system_config": {"metrics_report_interval_ms": 1000},  # metrics reach the endpoint within a second
        },
    )
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


#: run-table columns that measure time, not numbers
TIMING = {"wall_seconds", "client_seconds", "gpu_seconds", "latency_s", "start_time", "end_time", "resumed_at_task"}


def numbers(out) -> dict[str, list[dict]]:
    """A run's tables but `runs` (where it ran) without the columns that measure time; NaN as a
    string so that equal tables compare equal: what two runs that must agree are compared on."""
    import math

    def clean(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return {
        name: [{k: clean(v) for k, v in row.items() if k not in TIMING} for row in rows]
        for name, rows in out.tables.items()
        if name != "runs"
    }
