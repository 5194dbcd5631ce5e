"""The networks of the recommendation track: a SASRec encoder, FedDMMR's three experts and
its item-centric router (docs/recommendation.md gives the design and where it is silent).

Item ids inside the networks are shifted by one: 0 is padding, item i is row i + 1 of the
ID embedding. Sequences are right-aligned (most recent last) in windows of `max_seq_len`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EXPERTS = ("sequential", "visual", "semantic")


@dataclass(frozen=True)
class Shape:
    """The sizes a model is built with (from its method's config and the dataset)."""

    n_items: int
    max_seq_len: int = 50
    hidden: int = 128
    id_dim: int = 64
    blocks: int = 2
    heads: int = 4
    dropout: float = 0.1
    text_dim: int = 384
    visual_dim: int = 512
    experts: tuple[str, ...] = ("sequential",)


@dataclass
class MemoryView:
    """What the memory experts read, per row of a batch: text and visual features of its
    slots, and which slots are empty (True). Slot 0 is always the empty-memory slot (zeros),
    so a user whose memory holds nothing yet attends to it instead of to nothing."""

    text: torch.Tensor  # B x M x text_dim
    visual: torch.Tensor | None  # B x M x visual_dim
    empty: torch.Tensor  # B x M, bool

    def expand(self, n: int) -> MemoryView:
        """One user's view (B = 1) for `n` rows of a batch."""
        return MemoryView(
            self.text.expand(n, -1, -1), None if self.visual is None else self.visual.expand(n, -1, -1), self.empty.expand(n, -1)
        )


class SASRec(nn.Module):
    """Self-attentive sequential recommendation (Kang and McAuley, 2018): item ID embeddings
    projected to the hidden size, learned positions, causal transformer blocks; the output
    at each position represents the sequence up to it."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(s.n_items + 1, s.id_dim, padding_idx=0)
        nn.init.xavier_normal_(self.item_emb.weight)  # torch's N(0, 1) start makes BPR start far above ln 2
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.proj = nn.Linear(s.id_dim, s.hidden)
        self.pos_emb = nn.Embedding(s.max_seq_len, s.hidden)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(s.hidden, s.heads, 2 * s.hidden, s.dropout, batch_first=True, norm_first=True)
            for _ in range(s.blocks)
        )
        self.norm = nn.LayerNorm(s.hidden)
        self.drop = nn.Dropout(s.dropout)
        self.scale = math.sqrt(s.hidden)

    def items(self, ids: torch.Tensor) -> torch.Tensor:
        """Candidates' representations in the hidden space (what the sequential expert scores)."""
        return self.proj(self.item_emb(ids))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """B x L item ids (0 = padding) -> B x L x hidden. Padding positions are zeroed after
        every block (SASRec's timeline mask) rather than masked as keys, which would leave
        an all-padding query row without any key."""
        L = seq.shape[1]
        keep = (seq > 0).unsqueeze(-1).to(self.pos_emb.weight.dtype)
        x = self.drop(self.items(seq) * self.scale + self.pos_emb.weight[-L:]) * keep
        causal = torch.triu(torch.full((L, L), float("-inf"), device=seq.device), diagonal=1)
        for block in self.blocks:
            x = block(x, src_mask=causal) * keep
        return self.norm(x)


class SemanticExpert(nn.Module):
    """Multi-head attention from the candidate (its ID representation) over the memory's
    text features, residual + LayerNorm; scored against the sequence representation."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.kv = nn.Linear(s.text_dim, s.hidden)
        self.attn = nn.MultiheadAttention(s.hidden, s.heads, dropout=s.dropout, batch_first=True)
        self.norm = nn.LayerNorm(s.hidden)

    def forward(self, h: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor, mem: MemoryView, visual: torch.Tensor | None) -> torch.Tensor:
        kv = self.kv(mem.text)
        out, _ = self.attn(cand, kv, kv, key_padding_mask=mem.empty, need_weights=False)
        return (self.norm(cand + out) * h.unsqueeze(1)).sum(-1)


class VisualExpert(nn.Module):
    """Single-head attention (FedDMMR's LightweightAttention): the query from the candidate's
    visual feature, keys and values from the memory's visual features, projected to the
    hidden size; scored against the sequence representation."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(s.visual_dim, s.hidden) for _ in range(3))
        self.scale = 1.0 / math.sqrt(s.hidden)

    def forward(self, h: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor, mem: MemoryView, visual: torch.Tensor | None) -> torch.Tensor:
        assert visual is not None and mem.visual is not None
        q = self.q(visual[ids])  # B x C x hidden
        att = torch.einsum("bch,bmh->bcm", q, self.k(mem.visual)) * self.scale
        att = att.masked_fill(mem.empty.unsqueeze(1), float("-inf")).softmax(-1)
        return (torch.einsum("bcm,bmh->bch", att, self.v(mem.visual)) * h.unsqueeze(1)).sum(-1)


class Router(nn.Module):
    """Item-centric: expert weights from the candidate's ID embedding alone."""

    def __init__(self, s: Shape, n_experts: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(s.id_dim, 128),
            nn.LayerNorm(128),
            nn.ReLU(),
            nn.Dropout(s.dropout),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Dropout(s.dropout),
            nn.Linear(64, n_experts),
        )

    def forward(self, id_emb: torch.Tensor) -> torch.Tensor:
        return self.net(id_emb).softmax(-1)


class Recommender(nn.Module):
    """SASRec with a mixture of experts over candidates: final score = sum of the router's
    weights x the experts' scores. With the sequential expert alone there is no router and
    the model is plain SASRec."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        unknown = set(s.experts) - set(EXPERTS)
        if unknown or "sequential" not in s.experts:
            raise ValueError(f"experts must be a subset of {EXPERTS} with sequential in it, got {s.experts}")
        self.shape = s
        self.encoder = SASRec(s)
        self.experts = nn.ModuleDict()
        if "visual" in s.experts:
            self.experts["visual"] = VisualExpert(s)
        if "semantic" in s.experts:
            self.experts["semantic"] = SemanticExpert(s)
        self.router = Router(s, len(s.experts)) if len(s.experts) > 1 else None

    @property
    def uses_memory(self) -> bool:
        return len(self.experts) > 0

    def score(
        self, h: torch.Tensor, ids: torch.Tensor, mem: MemoryView | None, visual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of candidates `ids` (B x C, shifted ids) for sequence representations `h`
        (B x hidden), and the router's weights (B x C x experts; None without a router)."""
        cand = self.encoder.items(ids)
        seq = (cand * h.unsqueeze(1)).sum(-1)
        if self.router is None:
            return seq, None
        assert mem is not None
        scores = {"sequential": seq}
        for name, expert in self.experts.items():
            scores[name] = expert(h, cand, ids, mem, visual)
        weights = self.router(self.encoder.item_emb(ids))
        stacked = torch.stack([scores[e] for e in self.shape.experts], -1)
        return (weights * stacked).sum(-1), weights


def bpr_loss(scores: torch.Tensor) -> torch.Tensor:
    """BPR over one positive (column 0) and sampled negatives (the other columns)."""
    return -F.logsigmoid(scores[:, :1] - scores[:, 1:]).mean()


def load_balance(weights: torch.Tensor) -> torch.Tensor:
    """Squared deviation of the mean expert usage from uniform."""
    usage = weights.reshape(-1, weights.shape[-1]).mean(0)
    return ((usage - 1.0 / weights.shape[-1]) ** 2).sum()
