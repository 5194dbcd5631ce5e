"""Lightweight experts and the anchor-space classifier.

An expert refines a projected feature inside the anchor space with a residual MLP whose
last layer starts at zero (a new expert starts as the identity and cannot disturb the
pool). Classes are scored by a learned scale times the cosine similarity to their class
anchors; the global contrastive loss pulls projected features to their own class anchor
and away from the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return F.normalize(u + self.fc2(F.relu(self.fc1(u))), dim=-1)


def mix(experts: list[Expert], positions: list[int], u: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of the chosen experts' outputs, renormalised (B x d).

    `positions[i]` is expert i's index in the router's score columns. Sparse dispatch: each
    expert runs only on the samples routed to it, so the cost grows with top_k, not with
    the number of experts held."""
    out = torch.zeros_like(u)
    for pos, expert in zip(positions, experts):
        hit = top_idx == pos  # B x k
        rows = hit.any(1).nonzero().flatten()
        if len(rows) == 0:
            continue
        g = (gates * hit).sum(1)[rows]
        out = out.index_add(0, rows, g.unsqueeze(1) * expert(u[rows]))
    return F.normalize(out, dim=-1)


def anchor_logits(z: torch.Tensor, class_anchors: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    return log_scale.exp() * z @ class_anchors.T


def contrastive_loss(u: torch.Tensor, class_anchors: torch.Tensor, target_pos: torch.Tensor, temperature: float,
                     reduction: str = "mean") -> torch.Tensor:
    """InfoNCE between projected features and the class anchors (positives: own class)."""
    return F.cross_entropy(u @ class_anchors.T / temperature, target_pos, reduction=reduction)
