"""Frozen-backbone protocols: train a backbone on base classes, and probe a frozen one.

`pretrain` trains ResNet-18 (torchvision layout or the CIFAR variant) centrally on chosen
classes of the training split, the recipe of the B50 protocol: random crop + flip, SGD
with Nesterov momentum and a one-cycle schedule, label smoothing. It writes a state dict
that `backbone.weights: <path>` loads and a JSON beside it (classes, epochs, accuracy,
data digest, sha256).

`probe` measures frozen features before GPU hours are spent on them: nearest-class-mean
and linear-probe (logistic regression) accuracy on chosen classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.api import TrainContext, TrainSettings
from bench.config import BackboneConfig, ExperimentConfig
from bench.data import Dataset
from bench.errors import UserError
from bench.features import FeatureStore, best_device, file_sha256, preprocess, resnet18
from bench.features.backbones import family
from bench.inputs import Input, PrepareContext
from bench.progress import progress_bar
from bench.seeds import derive_seed
from bench.training import train_epochs


class ClassSpecError(UserError):
    pass


def parse_classes(spec: str | None, num_classes: int) -> list[int]:
    """'0-49', '50-99,3', or None for all classes."""
    if not spec:
        return list(range(num_classes))
    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = (int(v) for v in part.split("-"))
                out.extend(range(a, b + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise ClassSpecError(f"--classes expects ranges like 0-49 or lists like 1,2,5; got {spec!r}") from None
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ClassSpecError(f"--classes: {bad[:3]} out of range 0..{num_classes - 1}")
    return sorted(set(out))


def _subset(x: np.ndarray, y: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(y, classes)
    remap = {c: i for i, c in enumerate(classes)}
    return x[keep], np.array([remap[int(v)] for v in y[keep]], dtype=np.int64)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding and horizontal flip, per sample, from a seeded generator."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, cfg: BackboneConfig, device: torch.device) -> float:
    model.eval()
    correct = 0
    for a in range(0, len(x), 512):
        pred = model(preprocess(x[a : a + 512], cfg, device)).argmax(1).cpu().numpy()
        correct += int((pred == y[a : a + 512]).sum())
    return correct / max(len(y), 1)


def pretrain(
    ds: Dataset,
    cfg: BackboneConfig,
    classes: list[int],
    epochs: int,
    out: Path,
    batch_size: int = 128,
    max_lr: float = 0.2,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.1,
    seed: int = 0,
) -> dict:
    device = best_device(cfg.device)
    xtr, ytr = _subset(ds.train_x, ds.train_y, classes)
    xte, yte = _subset(ds.test_x, ds.test_y, classes)
    if len(xtr) == 0:
        raise ClassSpecError(f"no training images for classes {classes[:5]}...")
    torch.manual_seed(derive_seed(seed, "pretrain"))
    model = resnet18(cfg.variant, num_classes=len(classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = epochs * ((len(xtr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    gen = torch.Generator().manual_seed(derive_seed(seed, "pretrain", "batches"))
    history: list[float] = []
    t0 = time.time()

    def loss_fn(ib: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:  # minibatches of image indices
        xb = augment(preprocess(xtr[ib.numpy()], cfg, device), gen)
        return F.cross_entropy(model(xb), yb.to(device), label_smoothing=label_smoothing)

    recipe = TrainContext(seed, 0, 0, 0, TrainSettings(epochs, batch_size, "sgd", max_lr, 0.9, weight_decay))
    with progress_bar() as bar:
        job = bar.add_task(f"pretrain {cfg.variant} on {len(classes)} classes", total=steps)

        def evaluate(epoch: int) -> None:
            history.append(accuracy(model, xte, yte, cfg, device))
            bar.console.print(f"epoch {epoch + 1}/{epochs}: test accuracy on the {len(classes)} classes {history[-1]:.4f}")
            model.train()

        model.train()
        train_epochs(model.parameters(), torch.arange(len(xtr)), torch.from_numpy(ytr), recipe, loss_fn, gen, optimizer=opt,
                     after_step=lambda: (sched.step(), bar.advance(job)), after_epoch=evaluate)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out)
    digest = hashlib.sha256(np.ascontiguousarray(xtr).data).hexdigest()[:16]
    info = {
        "architecture": f"torchvision resnet18, variant={cfg.variant}, fc = Linear(512, {len(classes)})",
        "input": f"{cfg.input_size}x{cfg.input_size}, mean {list(cfg.mean)}, std {list(cfg.std)}",
        "dataset": ds.name,
        "classes": classes,
        "epochs": epochs,
        "recipe": f"SGD nesterov momentum 0.9, wd {weight_decay}, one-cycle max lr {max_lr}, batch {batch_size}, "
        f"label smoothing {label_smoothing}, random crop (pad 4, reflect) + flip, seed {seed}",
        "test_accuracy": history[-1] if history else None,
        "test_accuracy_per_epoch": history,
        "train_data_digest": digest,
        "train_seconds": round(time.time() - t0, 1),
        "sha256": file_sha256(out),
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


def ncm_accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    """Cosine nearest-class-mean (features L2-normalised)."""
    norm = lambda v: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    xtr, xte = norm(xtr.astype(np.float64)), norm(xte.astype(np.float64))
    k = int(ytr.max()) + 1
    means = np.stack([xtr[ytr == c].mean(0) for c in range(k)])
    d = (xte**2).sum(1, keepdims=True) - 2 * xte @ means.T + (means**2).sum(1)
    return float((d.argmin(1) == yte).mean())


def linear_probe_accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, seed: int = 0) -> float:
    """Multinomial logistic regression on standardised features (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1, random_state=seed))
    clf.fit(xtr, ytr)
    return float(clf.score(xte, yte))


def probe(store: FeatureStore, class_sets: dict[str, list[int]]) -> list[dict]:
    ds = store.dataset
    ftr, fte = np.asarray(store.features("train")), np.asarray(store.features("test"))
    rows = []
    for label, classes in class_sets.items():
        xtr, ytr = _subset(ftr, ds.train_y, classes)
        xte, yte = _subset(fte, ds.test_y, classes)
        rows.append(
            {
                "classes": label,
                "num_classes": len(classes),
                "ncm": ncm_accuracy(xtr, ytr, xte, yte),
                "linear_probe": linear_probe_accuracy(xtr, ytr, xte, yte),
                "n_train": len(ytr),
                "n_test": len(yte),
                "dataset": ds.name,
                "backbone": f"{store.cfg.arch}/{store.cfg.variant}/{store.cfg.weights}",
                "weights_digest": store.weights_digest(),
            }
        )
    return rows


def _check_weights(path: Path) -> tuple[bool, str]:
    """A state dict against the sha256 its pretrain JSON recorded."""
    info = path.with_suffix(".json")
    recorded = json.loads(info.read_text()).get("sha256") if info.exists() else None
    if recorded is None:
        return True, "no checksum recorded"
    if file_sha256(path) != recorded:
        return False, f"{path} does not match the sha256 in {info}; delete both and run prepare again"
    return True, f"sha256 matches {info.name}"


def backbone_input(cfg: ExperimentConfig) -> Input | None:
    """backbone.weights as an input of `fedame-bench prepare`, made by the config's
    `prepare.backbone` recipe; None when the weights are not a file (none, imagenet, hf:)."""
    bb = cfg.backbone
    if bb.weights in ("none", "imagenet") or family(bb) == "hf":
        return None
    path = Path(bb.weights).expanduser()
    recipe = cfg.prepare.backbone
    if recipe is None or family(bb) != "resnet18":
        return Input(
            "backbone weights",
            path,
            check=lambda: _check_weights(path),
            advice="this config has no prepare.backbone recipe: train one with `fedame-bench pretrain-backbone` "
            "and point backbone.weights at it",
        )

    def make(ctx: PrepareContext) -> None:
        ds = ctx.dataset()
        pretrain(
            ds, bb, parse_classes(recipe.classes, ds.num_classes), recipe.epochs, path, recipe.batch_size, recipe.max_lr, seed=recipe.seed
        )

    return Input(
        f"backbone trained on classes {recipe.classes}",
        path,
        check=lambda: _check_weights(path),
        make=make,
        cost=f"trains {recipe.epochs} epochs, {recipe.cost}" if recipe.cost else f"trains {recipe.epochs} epochs",
    )
