"""Distribution prompts: per class, a diagonal Gaussian in the anchor space whose mean is
the class anchor plus a residual of bounded norm.

Clients report sufficient statistics (count, sum, sum of squares) of their projected
features per class; the server pools them by counts, re-expresses the mean as anchor +
residual and clips the residual to the radius, so every estimate lives in one coordinate
system and can be averaged. Sampling a prompt replays an old class without its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedame.payload import AnchorPrompts

MIN_VAR = 1e-5
VAR_FLOOR = 0.1  # per-dimension variance floor, as a fraction of a unit vector's mean 1/d: keeps the
# Mahalanobis regulariser bounded when a class has few samples or collapsed features


def clip_residual(residual: np.ndarray, radius: float) -> np.ndarray:
    """Scale rows whose norm exceeds `radius` back onto the ball."""
    norms = np.linalg.norm(residual, axis=-1, keepdims=True)
    return residual * np.minimum(1.0, radius / np.maximum(norms, 1e-12))


@dataclass
class PromptBank:
    anchors: np.ndarray  # C x d class anchors
    radius: float
    residual: dict[int, np.ndarray] = field(default_factory=dict)
    var: dict[int, np.ndarray] = field(default_factory=dict)
    count: dict[int, float] = field(default_factory=dict)

    def mean(self, c: int) -> np.ndarray:
        return self.anchors[c] + self.residual[c]

    def update(self, classes: np.ndarray, counts: np.ndarray, sums: np.ndarray, sumsq: np.ndarray) -> None:
        """Replace the prompts of `classes` by the pooled statistics (from this round's clients)."""
        for i, c in enumerate(classes):
            n = float(counts[i])
            if n <= 0:
                continue
            mean = sums[i] / n
            var = np.maximum(sumsq[i] / n - mean**2, max(MIN_VAR, VAR_FLOOR / self.anchors.shape[1]))
            self.residual[int(c)] = clip_residual(mean - self.anchors[c], self.radius)
            self.var[int(c)] = var.astype(np.float32)
            self.count[int(c)] = n

    def move_to(self, c: int, mean: np.ndarray) -> None:
        """Set class c's mean (its variance kept), the residual clipped to the radius again."""
        self.residual[c] = clip_residual(mean - self.anchors[c], self.radius)

    def prompts(self, classes: list[int]) -> AnchorPrompts:
        """The prompts of those of `classes` that have one, in their order."""
        have = [c for c in classes if c in self.residual]
        d = self.anchors.shape[1]
        return AnchorPrompts(
            np.asarray(have, dtype=np.int64),
            np.stack([self.mean(c) for c in have]).astype(np.float32) if have else np.zeros((0, d), np.float32),
            np.stack([self.var[c] for c in have]) if have else np.zeros((0, d), np.float32),
        )


def class_statistics(u: torch.Tensor, y_pos: torch.Tensor, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class count, sum and sum of squares of projected features (client side)."""
    u = u.detach().double()
    counts = torch.bincount(y_pos, minlength=n_classes).double()
    sums = torch.zeros(n_classes, u.shape[1], dtype=torch.float64, device=u.device).index_add_(0, y_pos, u)
    sumsq = torch.zeros_like(sums).index_add_(0, y_pos, u * u)
    return counts.cpu().numpy(), sums.cpu().numpy(), sumsq.cpu().numpy()


def sample(mu: torch.Tensor, var: torch.Tensor, which: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Draws from the prompts `which` (indices into mu/var), projected back onto the sphere."""
    eps = torch.randn(len(which), mu.shape[1], generator=gen).to(mu.device)  # CPU draws: same on every device
    return F.normalize(mu[which] + var[which].sqrt() * eps, dim=-1)


def distribution_loss(u: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension squared Mahalanobis distance of features to their class prompt."""
    return (((u - mu) ** 2) / var).mean()
