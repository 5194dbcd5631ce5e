"""Any folder of images in the ImageFolder layout, and Tiny-ImageNet's own layout.

Recognised layouts under `data.root` (class names are the folder names):

* root/train/<class>/* and root/test/<class>/* (or root/val/<class>/*): the given split;
* root/<class>/*: one pool, split per class into train and test by `data.test_fraction`
  with a generator seeded from the file list (the same split on every machine);
* Tiny-ImageNet: root/train/<wnid>/images/*, root/val/images/* labelled by
  root/val/val_annotations.txt, class names from root/words.txt when present;
* with `data.domains: true`, root/<domain>/ holds one of the layouts above per domain
  (DomainNet's and Digit-5's folder layouts): each sample keeps its domain, and
  `scenario.tasks_by: domain` makes one task per domain.

Images are decoded with Pillow, converted to RGB and resized (bilinear) to
`data.image_size` square; when it is not set, all images must share one size. The
dataset's content digest (the feature cache's key) covers every decoded image, as for CIFAR.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from bench.config import DataConfig, where
from bench.data.base import DataError, Dataset
from bench.progress import progress_bar

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


Pairs = list[tuple[Path, str]]  # (image file, class folder name)


def _tiny_imagenet(root: Path) -> tuple[list[str], list[str], Pairs, Pairs] | None:
    ann = root / "val" / "val_annotations.txt"
    if not (ann.exists() and (root / "train").is_dir()):
        return None
    wnids = [p.name for p in _class_folders(root / "train")]
    train = [(f, w) for w in wnids for f in _images_in(root / "train" / w)]
    test = []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            test.append((root / "val" / "images" / parts[0], parts[1]))
    return wnids, _word_names(root, wnids), train, test


def _word_names(root: Path, wnids: list[str]) -> list[str]:
    words = root / "words.txt"
    if not words.exists():
        return wnids
    table = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
    return [table.get(w, w).split(",")[0].strip() for w in wnids]


def _listing(root: Path, test_fraction: float) -> tuple[list[str], list[str], Pairs, Pairs]:
    """The class folders, their display names, and the (file, class) pairs of each split."""

    if not root.is_dir():
        raise DataError(f"data.dataset=imagefolder: {where(root)} is not a folder; pass --data-dir or data.root")
    tiny = _tiny_imagenet(root)
    if tiny is not None:
        return tiny
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = [p.name for p in _class_folders(root / "train")]
        train = [(f, c) for c in classes for f in _images_in(root / "train" / c)]
        test = [(f, c.name) for c in _class_folders(test_dir) for f in _images_in(c)]
        return classes, classes, train, test
    classes = [p.name for p in _class_folders(root)]
    if not classes:
        raise DataError(
            f"data.dataset=imagefolder: no class folders in {where(root)} (expected ROOT/<class>/<image> "
            "or ROOT/train/<class>/ with ROOT/test/<class>/)"
        )
    train, test = [], []
    for c in classes:
        files = _images_in(root / c)
        seed = int.from_bytes(hashlib.sha256("\n".join(f.name for f in files).encode()).digest()[:8], "little")
        order = np.random.default_rng(seed).permutation(len(files))
        n_test = int(round(test_fraction * len(files)))
        test += [(files[i], c) for i in sorted(order[:n_test])]
        train += [(files[i], c) for i in sorted(order[n_test:])]
    return classes, classes, train, test


def _decode(pairs: list[tuple[Path, str]], index: dict[str, int], size: int | None, label: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    unknown = sorted({c for _, c in pairs if c not in index})
    if unknown:
        raise DataError(f"{label} images of classes not in the training folders: {unknown[:5]}")
    images = []
    with progress_bar() as bar:
        job = bar.add_task(f"decoding {label} images", total=len(pairs))
        for f, _ in pairs:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8))
            bar.advance(job)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{label} images have different sizes ({sorted(shapes)[:3]} ...); set data.image_size to resize them")
    x = np.stack(images) if images else np.zeros((0, size or 32, size or 32, 3), np.uint8)
    return x, np.array([index[c] for _, c in pairs], dtype=np.int64)


def _domain_listing(root: Path, test_fraction: float):
    """ROOT/<domain>/ each in one of the layouts above: the domains, the union of their
    classes, and each split's (file, class, domain) triples."""

    domains = [p.name for p in _class_folders(root)] if root.is_dir() else []
    if not domains:
        raise DataError(f"data.domains=true: no domain folders in {where(root)} (expected ROOT/<domain>/<class>/<image>)")
    train, test, classes = [], [], set()
    for d, name in enumerate(domains):
        cls, _, tr, te = _listing(root / name, test_fraction)
        classes.update(cls)
        train += [(f, c, d) for f, c in tr]
        test += [(f, c, d) for f, c in te]
    return domains, sorted(classes), train, test


def load_imagefolder(root: Path, cfg: DataConfig):

    if cfg.domains:
        domains, classes, train, test = _domain_listing(root, cfg.test_fraction)
        names = classes
    else:
        classes, names, pairs_train, pairs_test = _listing(root, cfg.test_fraction)
        domains, train, test = None, [(f, c, 0) for f, c in pairs_train], [(f, c, 0) for f, c in pairs_test]
    if not train or not test:
        raise DataError(
            f"data.dataset=imagefolder: {where(root)} has {len(train)} training and {len(test)} test images; "
            "both splits need images (set data.test_fraction for a single folder)"
        )
    index = {c: i for i, c in enumerate(classes)}
    train_x, train_y = _decode([(f, c) for f, c, _ in train], index, cfg.image_size, "train")
    test_x, test_y = _decode([(f, c) for f, c, _ in test], index, cfg.image_size or train_x.shape[1], "test")

    def domain_ids(triples) -> np.ndarray | None:
        return np.array([d for *_, d in triples], dtype=np.int64) if domains else None

    return Dataset(
        f"imagefolder-{root.name}",
        tuple(names),
        train_x,
        train_y,
        test_x,
        test_y,
        train_domain=domain_ids(train),
        test_domain=domain_ids(test),
        domain_names=tuple(domains) if domains else None,
    )
