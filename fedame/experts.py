"""Lightweight experts and the anchor-space classifier.

An expert refines a projected feature inside the anchor space with a residual MLP whose
last layer starts at zero (a new expert starts as the identity and cannot disturb the
pool). Classes are scored by a learned scale times the cosine similarity to their class
anchors; the global contrastive loss pulls projected features to their own class anchor
and away from the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedame.grouped import pad_runs, padded_slots, unpad_runs

# an expert's weights by their state-dict names ("fc1.weight", "fc1.bias", "fc2.weight",
# "fc2.bias"): a client holds them as plain tensors built straight from its payload, which
# costs a tenth of building `Expert` modules (and their random initialisation) every round
ExpertWeights = Mapping[str, torch.Tensor]
EXPERT_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class Expert(nn.Module):
    """The expert as a module: how the pool initialises a new one (`expert_delta` runs it
    from its weights)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return F.normalize(u + expert_delta(dict(self.named_parameters()), u), dim=-1)


def expert_delta(w: ExpertWeights, u: torch.Tensor) -> torch.Tensor:
    """The residual an expert adds to `u` (before renormalising)."""
    return F.linear(F.relu(F.linear(u, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"], w["fc2.bias"])


def mix(experts: list[ExpertWeights], positions: list[int], u: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of the chosen experts' outputs, renormalised (B x d).

    `positions[i]` is expert i's index in the router's score columns. Sparse dispatch: each
    expert runs only on the samples routed to it. The (sample, slot) pairs are grouped by
    expert with one stable sort, so every step is a handful of operations over all pairs,
    not a dozen per expert, whose per-operation overhead would add up to a large share of a
    CPU step (docs/fedame.md, cost). The pairs of an expert keep their sample order and each
    sample sums its experts in held order, as a loop over experts would."""
    column = torch.full((max(positions) + 1,), -1, dtype=torch.long, device=u.device)
    column[torch.as_tensor(positions, device=u.device)] = torch.arange(len(positions), device=u.device)
    pair_expert = column[top_idx.flatten()]  # held-expert index of each (sample, slot) pair
    order = torch.argsort(pair_expert, stable=True)
    counts = torch.bincount(pair_expert, minlength=len(experts)).tolist()
    rows = order // top_idx.shape[1]
    x = u.index_select(0, rows)  # its backward is an index_add, far cheaper on a CPU than u[rows]'s index_put
    active = [i for i, n in enumerate(counts) if n]
    z = F.normalize(x + grouped_delta([experts[i] for i in active], x, [counts[i] for i in active]), dim=-1)
    out = torch.zeros_like(u).index_add(0, rows, gates.flatten()[order].unsqueeze(1) * z)
    return F.normalize(out, dim=-1)


def grouped_delta(experts: list[ExpertWeights], x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert's residual on its run of consecutive rows of `x` (`counts[i]` rows for
    expert i), as two batched products over the runs padded to the longest. The experts'
    weights are stacked for the step, so each keeps its own parameters (and an expert that
    got no rows is not passed here: it gets no gradient, as when it ran alone); padded rows
    are never read back, so they add nothing to any gradient."""
    if len(experts) == 1:
        return expert_delta(experts[0], x)
    slot, longest = padded_slots(torch.tensor(counts, device=x.device))
    padded = pad_runs(x, slot, len(experts), longest)
    w1 = torch.stack([e["fc1.weight"] for e in experts]).transpose(1, 2)
    b1 = torch.stack([e["fc1.bias"] for e in experts]).unsqueeze(1)
    w2 = torch.stack([e["fc2.weight"] for e in experts]).transpose(1, 2)
    b2 = torch.stack([e["fc2.bias"] for e in experts]).unsqueeze(1)
    hidden = F.relu(torch.baddbmm(b1, padded, w1))
    return unpad_runs(torch.baddbmm(b2, hidden, w2), slot)


def anchor_logits(z: torch.Tensor, class_anchors: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    return log_scale.exp() * z @ class_anchors.T


def contrastive_loss(
    u: torch.Tensor, class_anchors: torch.Tensor, target_pos: torch.Tensor, temperature: float, reduction: str = "mean"
) -> torch.Tensor:
    """InfoNCE between projected features and the class anchors (positives: own class)."""
    return F.cross_entropy(u @ class_anchors.T / temperature, target_pos, reduction=reduction)
