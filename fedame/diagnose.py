"""Where FedAME's accuracy goes, measured after every task of a run.

Per task: accuracy on the task's new classes and on the old ones; routing accuracy (share of
test samples whose top-1 expert is the one that owns their class) and accuracy split by
routed right / wrong; the accuracy of the mixture alone and of the prompts' Gaussian scores
alone (the two parts of the classifier); per-expert accuracy (on the test samples of the classes it owns); and
prompt quality: a linear classifier trained only on samples drawn from the distribution
prompts against the same classifier trained on the real training features, both tested on
the real test features. `fedame-bench diagnose` runs this (docs/fedame.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.api import derive_seed
from bench.training import torch_generator
from fedame.feature_prompts import sample_features
from fedame.method import FedAME, on_device
from fedame.payload import FeaturePrompts
from fedame.prompts import sample
from fedame.router import route

PROBE_STEPS, PROBE_BATCH, PROBE_PER_CLASS = 300, 512, 200


def linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, test_x: torch.Tensor, test_y: torch.Tensor, seed: int) -> float:
    """Test accuracy of a softmax-linear classifier (Adam 1e-2, fixed steps) trained on (x, y)."""
    gen = torch_generator(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    head = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(PROBE_STEPS):
        idx = torch.randint(len(x), (PROBE_BATCH,), generator=gen)
        loss = F.cross_entropy(head((x[idx] - mean) / std), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head((test_x - mean) / std).argmax(1) == test_y).float().mean())


@torch.no_grad()
def prompt_samples(server: FedAME, seen: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """PROBE_PER_CLASS draws per seen class from the prompts replay uses; (x, class position,
    in feature space?)."""
    prompts = server.replay_prompts()
    which = torch.arange(len(prompts.classes)).repeat_interleave(PROBE_PER_CLASS)
    feature = isinstance(prompts, FeaturePrompts)
    if isinstance(prompts, FeaturePrompts):
        x = sample_features(on_device(prompts.mu), on_device(prompts.L), on_device(prompts.sd), which, gen)
    else:
        x = sample(on_device(prompts.mu), on_device(prompts.var), which, gen)
    pos = {c: i for i, c in enumerate(seen)}
    return x, torch.tensor([pos[int(c)] for c in prompts.classes])[which], feature


@torch.no_grad()
def routing(server: FedAME, x: torch.Tensor) -> np.ndarray:
    """Top-1 expert id of each sample among the alive experts."""
    alive = server.pool.alive
    u = server.router(server.proj(x))
    scores, _, _ = route(u, on_device(server.pool.expert_anchors(alive)), server.config.route_temperature, 1)
    return np.asarray(alive)[scores.argmax(1).numpy()]


def diagnose_task(
    server: FedAME, task: int, new: list[int], train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    seen = list(server.seen)
    tx, ty = test
    m = np.isin(ty, seen)
    tx, ty = torch.from_numpy(np.asarray(tx[m], dtype=np.float32)), ty[m]
    pred = server.predict(tx.numpy())
    correct = pred == ty
    mixture_only = float((server.predict(tx.numpy(), gaussian=False) == ty).mean())
    has_feature_prompts = bool(server.feature_prompts.mean)
    gaussian_only = float((server.predict(tx.numpy(), mixture=False, gaussian=True) == ty).mean()) if has_feature_prompts else float("nan")
    is_new = np.isin(ty, new)
    owner = np.asarray([server.pool.owner[int(c)] for c in ty])
    routed = routing(server, tx)
    right = routed == owner
    per_expert = [float(correct[owner == e].mean()) for e in server.pool.alive if np.any(owner == e)]

    gen = torch_generator(derive_seed(server.env.run_seed, "diagnose", task))
    px, py, feature = prompt_samples(server, seen, gen)
    pos = {c: i for i, c in enumerate(seen)}
    trx, tr_y = train
    keep = np.isin(tr_y, seen)
    rx = torch.from_numpy(np.asarray(trx[keep], dtype=np.float32))
    ry = torch.tensor([pos[int(c)] for c in tr_y[keep]])
    ty_pos = torch.tensor([pos[int(c)] for c in ty])
    with torch.no_grad():  # anchor-space prompts describe projected features
        probe_rx, probe_tx = (rx, tx) if feature else (server.proj(rx), server.proj(tx))
    seed = derive_seed(server.env.run_seed, "probe", task)
    return {
        "task": task,
        "acc_all": float(correct.mean()),
        "acc_new": float(correct[is_new].mean()),
        "acc_old": float(correct[~is_new].mean()) if np.any(~is_new) else float("nan"),
        "acc_mixture_only": mixture_only,
        "acc_gaussian_only": gaussian_only,
        "route_acc": float(right.mean()),
        "acc_routed_right": float(correct[right].mean()) if right.any() else float("nan"),
        "acc_routed_wrong": float(correct[~right].mean()) if (~right).any() else float("nan"),
        "experts": len(server.pool.alive),
        "expert_acc_min": min(per_expert),
        "expert_acc_median": float(np.median(per_expert)),
        "expert_acc_max": max(per_expert),
        "probe_on_prompts": linear_probe(px, py, len(seen), probe_tx, ty_pos, seed),
        "probe_on_real": linear_probe(probe_rx, ry, len(seen), probe_tx, ty_pos, seed),
    }
