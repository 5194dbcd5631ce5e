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

    def delta(self, u: torch.Tensor) -> torch.Tensor:
        """The residual the expert adds to `u` (before renormalising)."""
        return self.fc2(F.relu(self.fc1(u)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return F.normalize(u + self.delta(u), dim=-1)


def mix(experts: list[Expert], positions: list[int], u: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of the chosen experts' outputs, renormalised (B x d).

    `positions[i]` is expert i's index in the router's score columns. Sparse dispatch: each
    expert runs only on the samples routed to it, so the cost grows with top_k, not with
    the number of experts held. The (sample, slot) pairs are grouped by expert with one
    stable sort, so everything but the experts' own layers (the gather of their inputs, the
    residual, the renormalisation, the gates and the sum) is one operation over all pairs,
    not one per expert: per-operation overhead, not arithmetic, sets a CPU step's time. The
    pairs of an expert keep their sample order and each sample sums its experts in held
    order, as a loop over experts would."""
    column = torch.full((max(positions) + 1,), -1, dtype=torch.long, device=u.device)
    column[torch.as_tensor(positions, device=u.device)] = torch.arange(len(positions), device=u.device)
    pair_expert = column[top_idx.flatten()]  # held-expert index of each (sample, slot) pair
    order = torch.argsort(pair_expert, stable=True)
    counts = torch.bincount(pair_expert, minlength=len(experts)).tolist()
    rows = order // top_idx.shape[1]
    x = u.index_select(0, rows)  # its backward is an index_add, far cheaper on a CPU than the index_put of u[rows]
    deltas = [e.delta(part) for e, part, n in zip(experts, x.split(counts), counts) if n]
    z = F.normalize(x + torch.cat(deltas), dim=-1)
    out = torch.zeros_like(u).index_add(0, rows, gates.flatten()[order].unsqueeze(1) * z)
    return F.normalize(out, dim=-1)


def anchor_logits(z: torch.Tensor, class_anchors: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    return log_scale.exp() * z @ class_anchors.T


def contrastive_loss(u: torch.Tensor, class_anchors: torch.Tensor, target_pos: torch.Tensor, temperature: float,
                     reduction: str = "mean") -> torch.Tensor:
    """InfoNCE between projected features and the class anchors (positives: own class)."""
    return F.cross_entropy(u @ class_anchors.T / temperature, target_pos, reduction=reduction)
