"""Attention over clients (the research notes' FedAMP-style server): clients are tokens, and
each client's model for the next round is its own attention-weighted mix of the round's models.

A client's token is the seeded count sketch of its trained parameters beside that of its
update (trained minus what it started from), each of unit length: two clients are close
when their models and the directions they moved in agree. Client k's weights over the
round's clients j are softmax_j(<t_k, t_j> / temperature) (its own token included), and
its next model is the weighted sum of their models. A client whose update points elsewhere
(a malicious one, a very different distribution) gets less weight from the others.

The weights of every round are the `attention` table (round, client, peer, weight); each
peer's mean weight over the other receivers (its weight on itself left out) is its share in
the rounds table (`agg_shares`), so `malicious_share` there is the attention an attacker got
from the others. The run's `aggregation.rule` does
not apply: attention is this method's aggregation.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from baselines.pfl.common import PFLServer, State
from baselines.pfl.model import PFLConfig
from bench.api import ClientUpdate, Message, derive_seed, register
from bench.federation import count_sketch


class AttentionConfig(PFLConfig):
    temperature: float = Field(0.3, gt=0)
    sketch_dim: int = Field(256, ge=8)


def attention_weights(models: np.ndarray, updates: np.ndarray, temperature: float, dim: int, seed: int) -> np.ndarray:
    """Row k: client k's softmax weights over the clients (rows of `models` and `updates`, flat)."""
    tokens = np.concatenate([count_sketch(models, dim, seed), count_sketch(updates, dim, derive_seed(seed, "update"))], 1) / np.sqrt(2)
    logits = tokens @ tokens.T / temperature
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def trust_from_others(A: np.ndarray) -> np.ndarray:
    """Column j: the mean weight the other clients give client j. Self-attention is left out,
    or a client that trusts only itself would seem trusted by the federation. A round with one
    client has no others: that client is the whole aggregate, share 1."""
    n = len(A)
    return (A.sum(0) - np.diag(A)) / (n - 1) if n > 1 else np.ones(n)


@register
class FedAMPAttention(PFLServer):
    name = "fedamp_attention"
    summary = "Attention over clients: each client's next model is a softmax mix of the round's models by sketch similarity"
    Config = AttentionConfig
    config: AttentionConfig
    extra_tables = {"attention": pa.schema([("round", pa.int64()), ("client", pa.int64()), ("peer", pa.int64()), ("weight", pa.float64())])}

    def setup(self) -> None:
        super().setup()
        self.personal: dict[int, State] = {}
        self.attention_rows: list[dict[str, Any]] = []

    def payload_for(self, client_id: int) -> Message:
        """A client's own mix from the last round it took part in (the mean of the last round's
        models before it has one: a new client's start)."""
        return Message(self.personal.get(client_id, self.glob))

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        keys = self.client.keys
        ids = [u.client_id for u in updates]
        models = np.stack([np.concatenate([u.arrays[k].ravel() for k in keys]) for u in updates]).astype(np.float64)
        starts = np.stack([np.concatenate([self.personal.get(i, self.glob)[k].ravel() for k in keys]) for i in ids])
        A = attention_weights(
            models, models - starts, self.config.temperature, self.config.sketch_dim, derive_seed(self.env.run_seed, "pfl-attention")
        )
        sizes = np.cumsum([0, *[self.glob[k].size for k in keys]])

        def unflat(v: np.ndarray) -> State:
            return {k: v[a:b].reshape(self.glob[k].shape).astype(self.glob[k].dtype) for k, a, b in zip(keys, sizes[:-1], sizes[1:])}

        for row, i in zip(A, ids):
            self.personal[i] = unflat(row @ models)
        n = np.array([u.num_samples for u in updates], dtype=np.float64)
        self.glob = unflat((n / n.sum()) @ models)
        for j, share in zip(ids, trust_from_others(A)):
            self._shares.setdefault(j, []).append(float(share))
        self.attention_rows += [
            {"round": self.round, "client": i, "peer": j, "weight": float(A[a, b])} for a, i in enumerate(ids) for b, j in enumerate(ids)
        ]
        self.round += 1

    def extra_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {"attention": self.attention_rows}

    @classmethod
    def figures(cls, rounds: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """The attention matrix of a run's last round, self-weights left out and colour on a log
        scale (a client's weight on itself can be 99.9 %, which would hide who trusts whom);
        and, for runs under attack, the attention the attackers got from the others over
        rounds beside the median client's and a uniform mix's share, on a log scale."""
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm

        out: dict[str, Any] = {}
        att = extra.get("attention")
        if att is not None and not att.empty:
            run = sorted(att.run_id.unique())[0]
            last = att[(att.run_id == run) & (att["round"] == att[att.run_id == run]["round"].max())]
            M = last.pivot(index="client", columns="peer", values="weight").to_numpy().copy()
            own = float(np.diag(M).mean())
            np.fill_diagonal(M, np.nan)
            fig, ax = plt.subplots(figsize=(4.8, 4))
            positive = M[np.isfinite(M) & (M > 0)]
            norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
            im = ax.imshow(M, cmap="viridis", norm=norm)
            ax.set(xlabel="peer", ylabel="client", title=f"attention on the others, last round\n(self-weight left out, its mean {own:.4f})")
            ax.title.set_fontsize("small")
            fig.colorbar(im, ax=ax)
            out["pfl_attention_matrix"] = fig
        attacked = rounds.dropna(subset=["malicious_share"]) if "malicious_share" in rounds else rounds.iloc[:0]
        if not attacked.empty:
            fig, ax = plt.subplots(figsize=(5, 4.4))
            for run, sel in attacked.groupby("run_id"):
                median = [float(np.median(list(json.loads(x).values()))) for x in sel.agg_shares]
                (line,) = ax.plot(sel["round"] + 1, sel.malicious_share, label=f"attackers, summed ({run})")
                ax.plot(sel["round"] + 1, median, "--", color=line.get_color(), label="the median client")
            ax.plot(attacked["round"] + 1, 1.0 / attacked.clients_used, ":", color="0.5", label="uniform share")
            ax.set(xlabel="round", ylabel="mean weight from the others", title="Attention under attack", yscale="log")
            ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.2))
            out["pfl_attention_attacker"] = fig
        return out
