"""Drift compensation of the anchor-space prompts (`prompt_drift: sdc`; off in the design).

Why: an anchor-space prompt summarises projected features of a class whose data is gone, so
it goes stale as soon as the projector moves. Semantic drift compensation (Yu et al., CVPR
2020) estimates how far an old class's features moved from how the current task's features
moved: each client projects its samples through the previous task's projector (the KL
teacher's) and through the projector it received, and reports, per old class, the
sum of the moves weighted by exp(-||u_now - mean||^2 / 2 sigma^2) around that class's
current prompt mean, and the sum of the weights. The server adds the pooled mean move to the
mean the prompt had when its task ended; the residual is clipped to the bound again, so a
compensated prompt is still anchor + bounded residual.
"""

from __future__ import annotations

import numpy as np
import torch

from fedame.payload import DriftReport


@torch.no_grad()
def drift_report(classes: np.ndarray, u_then: torch.Tensor, u_now: torch.Tensor, means: torch.Tensor, sigma: float) -> DriftReport:
    """Per prompt of `classes` (its mean a row of `means`, in the anchor space now): weighted
    sum of the moves u_now - u_then of this client's samples, and the sum of the weights."""
    w = torch.exp(-(torch.cdist(u_now.double(), means.double()) ** 2) / (2 * sigma**2))  # n x P
    return DriftReport(classes, (w.T @ (u_now - u_then).double()).cpu().numpy(), w.sum(0).cpu().numpy())


def compensated(base: np.ndarray, sums: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The means at their task's end moved by the pooled weighted mean move (unmoved where no
    client's sample came near: weight 0)."""
    move = sums / np.maximum(weights, 1e-12)[:, None]
    return np.where(weights[:, None] > 1e-12, base + move, base).astype(np.float32)
