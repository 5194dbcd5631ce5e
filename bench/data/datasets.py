"""Datasets as plain arrays: CIFAR-10/100 from torchvision's on-disk format, synthetic, or an
image folder (bench/data/imagefolder.py).

The CIFAR pickles are read directly (the format is tiny and stable) so that small test
fixtures in the same format load too; torchvision is used to download them when the files
are missing and a network is there. Offline, a missing dataset is one clear error naming
the directory and files expected.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.config import DataConfig, where
from bench.data.base import DataError, Dataset
from bench.inputs import Input

_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta"),
}
_DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedame-bench" / "data"


def resolve_data_dir(cli_value: str | None, config_value: str | None) -> Path:
    """--data-dir, then FEDAME_DATA_DIR, then the config's data.root, then the user cache dir."""
    for v in (cli_value, os.environ.get("FEDAME_DATA_DIR"), config_value):
        if v:
            return Path(v).expanduser()
    return default_data_dir()


def _network_reachable(host: tuple[str, int], timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _missing_files(root: Path, name: str) -> list[Path]:
    folder, train, test, meta = _LAYOUT[name]
    return [root / folder / f for f in [*train, *test, meta] if not (root / folder / f).exists()]


def ensure_cifar(root: Path, name: str) -> None:
    """Make sure the CIFAR files are under `root`, downloading through torchvision if possible."""
    missing = _missing_files(root, name)
    if not missing:
        return
    folder = root / _LAYOUT[name][0]
    if not _network_reachable(_DOWNLOAD_HOST):
        raise DataError(
            f"{name} not found: expected {', '.join(str(m.name) for m in missing)} in {where(folder)}; "
            f"no network to download it. Put torchvision's {name} files there or pass --data-dir "
            f"(or FEDAME_DATA_DIR) pointing at the folder that contains {folder.name}/"
        )
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


def _official_md5(name: str) -> dict[str, str]:
    """torchvision's md5 sums of the CIFAR files, by file name."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    return {f: md5 for f, md5 in [*cls.train_list, *cls.test_list]} | {cls.meta["filename"]: cls.meta["md5"]}


def _check_cifar(root: Path, name: str) -> tuple[bool, str]:
    folder = root / _LAYOUT[name][0]
    missing = _missing_files(root, name)
    if missing:
        return False, f"{folder} lacks {', '.join(m.name for m in missing)}; delete the folder and run prepare again"
    for fname, md5 in _official_md5(name).items():
        with open(folder / fname, "rb") as f:
            if hashlib.file_digest(f, "md5").hexdigest() != md5:
                return False, f"{folder / fname} differs from torchvision's official file (md5); delete it and run prepare again"
    return True, "md5 sums match torchvision's"


def dataset_input(cfg: DataConfig, data_dir: Path) -> Input | None:
    """The dataset as an input of `fedame-bench prepare`; None for synthetic data."""
    if cfg.dataset == "synthetic":
        return None
    if cfg.dataset == "imagefolder":
        return Input(
            "the image folder",
            Path(data_dir),
            check=lambda: (True, "not checksummed (a user's folder)"),
            advice="an image folder is the user's own data: put it there or pass --data-dir",
        )
    if cfg.dataset == "ml100k":
        from bench.data.movielens import movielens_input

        return movielens_input(Path(data_dir))
    name = cfg.dataset
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    return Input(
        f"{label} (torchvision's files)",
        Path(data_dir) / _LAYOUT[name][0],
        check=lambda: _check_cifar(Path(data_dir), name),
        make=lambda ctx: ensure_cifar(Path(data_dir), name),
        cost="downloads about 170 MB",
        fetched_by_run=True,
    )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_batches(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    xs, ys, coarse = [], [], []
    for fname in files:
        d = _unpickle(folder / fname)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
        if "coarse_labels" in d:
            coarse.append(np.asarray(d["coarse_labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), (np.concatenate(coarse) if coarse else None)


def load_cifar(root: Path, name: str) -> Dataset:
    ensure_cifar(root, name)
    folder_name, train_files, test_files, meta_file = _LAYOUT[name]
    folder = root / folder_name
    label_key = "labels" if name == "cifar10" else "fine_labels"
    try:
        meta = _unpickle(folder / meta_file)
        train_x, train_y, train_coarse = _read_batches(folder, train_files, label_key)
        test_x, test_y, _ = _read_batches(folder, test_files, label_key)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
        raise DataError(f"{name} files in {folder} are unreadable ({e}); delete them and download again") from None
    class_names = tuple(meta["label_names"] if name == "cifar10" else meta["fine_label_names"])
    superclasses = superclass_names = None
    if train_coarse is not None:
        mapping = np.zeros(len(class_names), dtype=np.int64)
        mapping[train_y] = train_coarse
        superclasses = tuple(int(c) for c in mapping)
        superclass_names = tuple(meta.get("coarse_label_names", ())) or None
    return Dataset(name, class_names, train_x, train_y, test_x, test_y, superclasses, superclass_names)


def make_synthetic(cfg: DataConfig, seed: int = 1234) -> Dataset:
    """Images whose class is a smooth random colour pattern plus noise: learnable, offline, fast."""
    s = cfg.synthetic
    rng = np.random.default_rng(seed)
    k = s.num_classes
    coarse = rng.uniform(0, 255, size=(k, 4, 4, 3))
    reps = s.image_size // 4
    templates = np.kron(coarse, np.ones((1, reps, reps, 1)))

    def split(n_per: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(k), n_per)
        x = templates[y] + rng.normal(0, 40, size=(len(y), s.image_size, s.image_size, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    train_x, train_y = split(s.train_per_class)
    test_x, test_y = split(s.test_per_class)
    names = tuple(f"class_{i}" for i in range(k))
    groups = tuple(i % 2 for i in range(k))  # two "superclasses", for cluster-aware methods
    return Dataset("synthetic", names, train_x, train_y, test_x, test_y, groups, ("even", "odd"))


def _cap_per_class(y: np.ndarray, cap: int | None) -> np.ndarray:
    """Which samples to keep: the first `cap` of every class (deterministic; order preserved)."""
    keep = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        keep[np.flatnonzero(y == c)[:cap]] = True
    return keep if cap is not None else np.ones(len(y), dtype=bool)


def load_dataset(cfg: DataConfig, data_dir: Path) -> Dataset:
    if cfg.dataset == "imagefolder":
        from bench.data.imagefolder import load_imagefolder

        ds = load_imagefolder(Path(data_dir), cfg)
    elif cfg.dataset == "ml100k":
        from bench.data.movielens import load_movielens

        return load_movielens(Path(data_dir))
    else:
        ds = make_synthetic(cfg) if cfg.dataset == "synthetic" else load_cifar(data_dir, cfg.dataset)
    if cfg.max_train_per_class or cfg.max_test_per_class:
        tr, te = _cap_per_class(ds.train_y, cfg.max_train_per_class), _cap_per_class(ds.test_y, cfg.max_test_per_class)
        dom = (ds.train_domain[tr], ds.test_domain[te]) if ds.train_domain is not None else (None, None)
        ds = replace(
            ds,
            train_x=ds.train_x[tr],
            train_y=ds.train_y[tr],
            test_x=ds.test_x[te],
            test_y=ds.test_y[te],
            train_domain=dom[0],
            test_domain=dom[1],
        )
    return ds
