"""Class prototypes shared through the server (CPA, FedProto): a client sends the per-class
sums and counts of its base features; the server sums them over the round's clients (an
exact mean, not a mean of means) and sends back each class's mean and its global count."""

from __future__ import annotations

import numpy as np
import torch

from baselines.pfl.model import SplitNet
from bench.api import ClientUpdate

State = dict[str, np.ndarray]


def prototype_sums(model: SplitNet, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> State:
    with torch.no_grad():
        feats = model.base(x)
    sums = torch.zeros(num_classes, feats.shape[1], device=x.device).index_add_(0, y, feats)
    counts = torch.bincount(y, minlength=num_classes)
    return {"proto_sum": sums.cpu().numpy(), "proto_count": counts.cpu().numpy().astype(np.float32)}


def global_prototypes(updates: list[ClientUpdate]) -> tuple[np.ndarray, np.ndarray]:
    """(each class's mean feature over the round's clients, 0 for a class nobody holds; its count)."""
    sums = np.sum([u.arrays["proto_sum"] for u in updates], axis=0)
    counts = np.sum([u.arrays["proto_count"] for u in updates], axis=0)
    return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0).astype(np.float32), counts


def prototype_distance(feats: torch.Tensor, y: torch.Tensor, glob: State) -> torch.Tensor:
    """Each sample's mean squared difference to its class's global prototype, over the
    features: FedProto's reference code (and PFLlib's) takes an MSE loss, so a method's `lam`
    means what the papers' does and does not grow with the feature width."""
    proto = torch.as_tensor(glob["proto"], device=feats.device)
    return ((feats - proto[y]) ** 2).mean(1)
