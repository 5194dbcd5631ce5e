"""The anchor-based router: features projected into the anchor space are scored against
each expert's anchor (the normalised mean of the class anchors it owns) with a
temperature; the top-k experts get softmax gates. The routing loss teaches the projection
to send each sample to the expert that owns its class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """Backbone features -> anchor space (L2-normalised)."""

    def __init__(self, in_dim: int, anchor_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.net = (
            nn.Linear(in_dim, anchor_dim)
            if hidden == 0
            else nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, anchor_dim))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class RouterHead(nn.Module):
    """What the router scores: the projected feature itself (`learned=False`: the plain
    anchor-based router, no parameters), or a learned map inside the anchor space used only
    for routing (identity at the start), so routing keeps learning when the projector is
    frozen. The map is a d x d matrix: as much arithmetic per sample as the projector and as
    many bytes per round."""

    def __init__(self, dim: int, learned: bool = True) -> None:
        super().__init__()
        self.map = nn.Linear(dim, dim, bias=False) if learned else None
        if self.map is not None:
            nn.init.eye_(self.map.weight)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.map is None else F.normalize(self.map(u), dim=-1)


def route(
    u: torch.Tensor, expert_anchors: torch.Tensor, temperature: float, top_k: int, usable: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores over every expert (B x E), and the top-k *usable* experts (those the caller
    holds) with their softmax gates (B x k)."""
    scores = u @ expert_anchors.T / temperature
    masked = scores if usable is None else scores.masked_fill(~usable, float("-inf"))
    k = min(top_k, int(usable.sum()) if usable is not None else expert_anchors.shape[0])
    top = masked.topk(k, dim=1)
    return scores, top.indices, torch.softmax(top.values, dim=1)


def routing_loss(scores: torch.Tensor, owner_pos: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the router scores against the column of each sample's owner expert."""
    return F.cross_entropy(scores, owner_pos, reduction=reduction)
