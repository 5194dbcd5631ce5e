"""FedAME: Federated Anchor-guided Mixture-of-Experts, as a server/client pair.

Server: class anchors (text embeddings), the expert pool with its ownership map, the
decision maker that places each new class, the projector and logit scale, the
distribution prompts, and a snapshot of the previous task's model (the KL teacher).
Client: receives the projector, the router's expert anchors and only the experts its
classes route to; trains them with
    CE + l1·routing + l2·contrastive + l3·KL(previous model) + l4·distribution
on its features plus samples replayed from the prompts of old classes; returns the trained
parameters and its per-class feature statistics.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

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
from bench.inputs import Input
from bench.training import (
    as_tensor,
    batched_argmax,
    distillation,
    load_module_arrays,
    module_arrays,
    module_from_arrays,
    tensor_arrays,
    torch_generator,
    train_epochs,
)
from fedame import records
from fedame.anchors import AnchorConfig, AnchorError, ClusterConfig, anchors_input, class_anchors, config_clusters, kmeans_clusters
from fedame.experts import EXPERT_KEYS, ExpertWeights, anchor_logits, contrastive_loss, mix
from fedame.feature_prompts import FeaturePromptBank, client_report, draw_noise, features_from_noise, scatter_rows
from fedame.gaussian import mahalanobis
from fedame.llm import Decision, DecisionMaker, LLMConfig, LLMRequiredError, RuleConfig, ask_clusters
from fedame.pool import ExpertPool
from fedame.prompts import PromptBank, class_statistics, distribution_loss, sample
from fedame.router import Projector, RouterHead, route, routing_loss


class LossWeights(Section):
    route: float = Field(0.5, ge=0)  # l1
    contrast: float = Field(0.5, ge=0)  # l2
    forget: float = Field(1.0, ge=0)  # l3 (KL to the previous task's model)
    dist: float = Field(0.05, ge=0)  # l4 (distribution regulariser)


class FedAMEConfig(MethodConfig):
    anchors: AnchorConfig = AnchorConfig()
    clusters: ClusterConfig = ClusterConfig()
    decisions: Literal["llm", "heuristic"] = "llm"  # llm: used when its key is set, else the rule
    llm: LLMConfig = LLMConfig()
    rule: RuleConfig = RuleConfig()
    projector_hidden: int = Field(0, ge=0)
    # lightweight experts: a residual MLP d -> expert_hidden -> d each. 32 costs a quarter of
    # 128's bytes and arithmetic at the same accuracy (docs/fedame.md, cost)
    expert_hidden: int = Field(32, ge=1)
    # route on the projected feature itself (false: the plain anchor-based router; the
    # projector learns to route through the routing loss) or on a learned d x d map of it
    # (true). The map matters only when the projector is frozen (`freeze_projector_after`);
    # otherwise it costs as much as the projector in arithmetic and bytes for no accuracy
    router_map: bool = False
    top_k: int = Field(2, ge=1)
    route_temperature: float = Field(0.1, gt=0)
    contrast_temperature: float = Field(0.1, gt=0)
    kd_temperature: float = Field(2.0, gt=0)
    init_scale: float = Field(16.0, gt=0)
    lambdas: LossWeights = LossWeights()
    replay: bool = True
    replay_ratio: float = Field(1.0, ge=0)  # replayed samples per real sample in a batch
    # where replay draws from: "feature" keeps each class's prompt as a low-rank Gaussian of
    # backbone features (frozen, so it never goes stale) and replays it through the current
    # projector; "anchor" draws from the anchor-space prompts (valid only while the projector
    # is frozen)
    prompt_space: Literal["anchor", "feature"] = "feature"
    prompt_rank: int = Field(32, ge=0)  # covariance rank of a feature-space prompt
    # which classes the classification terms (CE, routing) learn from prompts: "old" replays
    # earlier tasks' classes next to the real data of the current ones; "seen" learns every
    # class that has a prompt from its prompt, so old and new classes are seen through the
    # same kind of sample (real data still drive the contrastive, KL and distribution terms)
    replay_classes: Literal["old", "seen"] = "seen"
    # class logits = scale * (cos(expert output, class anchor) + w * cos(projected feature,
    # class prototype)); the prototype is the prompt mean, anchor + residual bounded by the
    # radius (in feature mode: the feature prompt's mean through the current projector). The
    # second term does not depend on routing. 0: anchors only (the old behaviour)
    prototype_weight: float = Field(1.0, ge=0)
    # class logits at evaluation += w * (-1/2 Mahalanobis distance to the class's feature prompt,
    # covariance shrunk by `gaussian_shrink` as FeCAM does): the log-likelihood of the prompt's
    # Gaussian, so w = 1 multiplies the mixture's class probabilities by the prompts'. The
    # prompts are exact summaries of frozen features, so this term does not forget and does not
    # depend on routing. 0: the mixture alone (needs no feature prompts)
    gaussian_weight: float = Field(1.0, ge=0)
    gaussian_shrink: float = Field(1.0, ge=0)
    # which samples the contrastive term (InfoNCE to the class anchors) sees: "replay" the same
    # samples and weights as CE (old classes through their prompts, so old and new classes are
    # pulled to their anchors alike); "real" only the current task's real samples (it sharpens
    # the current classes alone, and they are over-predicted until the next task arrives;
    # docs/fedame.md)
    contrast_samples: Literal["replay", "real"] = "replay"
    balanced_replay: bool = True  # weigh replay so old and new classes count alike
    prompt_radius: float = Field(0.5, gt=0)
    single_expert: bool = False  # ablation: one shared expert owns every class
    download_all_experts: bool = False  # ablation: clients receive the whole pool
    # FedAME's own optimiser (its cosine-anchor heads train far better with Adam than with
    # the SGD the linear-head baselines use); null falls back to the training section
    optimizer: Literal["sgd", "adam", "adamw"] | None = "adam"
    lr: float | None = Field(1e-3, gt=0)
    # FedAME's own minibatch size (null: the training section's). On a CPU 128 nearly halves
    # the time of 64 at the same accuracy: a step of 64 is mostly per-operation overhead, one
    # of 128 mostly passes over its rows (docs/fedame.md, cost)
    batch_size: int | None = Field(128, ge=1)
    # freeze the projector after this task so prompts stay valid (-1: from the start; None: never)
    freeze_projector_after: int | None = Field(None, ge=-1)
    projector_init: Literal["default", "orthogonal"] = "default"

    @model_validator(mode="after")
    def _gaussian_needs_feature_prompts(self) -> FedAMEConfig:
        if self.gaussian_weight > 0 and self.prompt_space != "feature":
            raise ValueError(
                "gaussian_weight > 0 scores test features against the feature-space prompts: "
                "set prompt_space: feature, or gaussian_weight: 0"
            )
        return self


# ------------------------------------------------------------------------------ shared model pieces


def build_projector(cfg: FedAMEConfig, env: MethodEnv, anchor_dim: int) -> Projector:
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(env.run_seed, "fedame", "projector"))
        proj = Projector(env.feature_dim, anchor_dim, cfg.projector_hidden)
        if cfg.projector_init == "orthogonal":  # information-preserving start
            for m in proj.modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.orthogonal_(m.weight)
                    torch.nn.init.zeros_(m.bias)
        return proj


def load_experts(
    arrays: dict[str, np.ndarray], ids: np.ndarray, prefix: str, device: str = "cpu", trainable: bool = False
) -> list[dict[str, torch.Tensor]]:
    """The weights of experts `ids` as tensors on `device` (copies: training leaves the
    payload alone); `trainable`: leaves that require a gradient."""
    return [
        {k: as_tensor(np.array(arrays[f"{prefix}expert.{int(e)}.{k}"]), device).requires_grad_(trainable) for k in EXPERT_KEYS} for e in ids
    ]


def t(a: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return as_tensor(a, device)


class AnchorMoE:
    """Router + experts + anchor classifier over anchor-space features.

    The router scores every expert of the pool (their anchors are cheap to send); only the
    `experts` held here (at score columns `positions`) are mixed."""

    def __init__(
        self,
        cfg: FedAMEConfig,
        router: RouterHead,
        experts: list[ExpertWeights],
        positions: list[int],
        expert_anchors: torch.Tensor,
        class_anchors: torch.Tensor,
        log_scale: torch.Tensor,
    ) -> None:
        self.cfg, self.router, self.experts, self.positions = cfg, router, experts, positions
        self.expert_anchors, self.class_anchors, self.log_scale = expert_anchors, class_anchors, log_scale
        self.usable = torch.zeros(expert_anchors.shape[0], dtype=torch.bool, device=expert_anchors.device)
        self.usable[positions] = True

    def __call__(self, u: torch.Tensor, protos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, router scores over all experts); `protos`: class prototypes in the
        order of the class anchors, scored against `u` with weight `prototype_weight`."""
        scores, top, gates = route(self.router(u), self.expert_anchors, self.cfg.route_temperature, self.cfg.top_k, self.usable)
        z = mix(self.experts, self.positions, u, top, gates)
        logits = anchor_logits(z, self.class_anchors, self.log_scale)
        if protos is not None and self.cfg.prototype_weight > 0:
            logits = logits + self.cfg.prototype_weight * anchor_logits(u, protos, self.log_scale)
        return logits, scores

    def parameters(self) -> list[torch.Tensor]:
        return [*self.router.parameters(), *(p for e in self.experts for p in e.values()), self.log_scale]


def prototypes(anchors: torch.Tensor, radius: float, pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per class (rows of `anchors`): anchor + residual clipped to `radius`, normalised; the
    residual points to `target`, the prompt means of the classes at `pos` in the anchor space
    (feature-space means go through the current projector first, so the prototype follows
    it), zero for the others."""
    if len(pos) == 0:
        return anchors
    residual = target - anchors[pos]
    norm = residual.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    residual = residual * torch.clamp(radius / norm, max=1.0)
    return anchors.index_put((pos,), F.normalize(anchors[pos] + residual, dim=-1))


def build_moe(cfg: FedAMEConfig, a: dict[str, np.ndarray], prefix: str, class_anchors: torch.Tensor) -> AnchorMoE | None:
    """The model part of a payload (prefix "" for the current model, "teacher." for the
    teacher), on the device of `class_anchors`."""
    held = a[f"{prefix}held"]
    if len(held) == 0:
        return None
    d, dev = class_anchors.shape[1], class_anchors.device
    router = module_from_arrays(lambda: RouterHead(d, cfg.router_map), a, f"{prefix}router.", dev)
    experts = load_experts(a, held, prefix, dev, trainable=prefix == "")
    log_scale = torch.nn.Parameter(t(a[f"{prefix}log_scale"], dev).clone())
    expert_anchors = t(a[f"{prefix}expert_anchors"], dev)
    return AnchorMoE(cfg, router, experts, a[f"{prefix}held_pos"].tolist(), expert_anchors, class_anchors, log_scale)


# ------------------------------------------------------------------------------ client


class Replay:
    """Draws replayed samples with their class positions: backbone features in feature mode
    (the caller projects them, together with its real samples), anchor-space points otherwise.

    Feature-mode samples are drawn an epoch at a time (`per_step`: how many each step of an
    epoch replays), at the epoch's first step: the generator is called in the same order as
    step by step, so the classes and noise are the same, and the epoch's low-rank products
    are one grouped product instead of one gather and product per step (the same dot
    products; batched differently, they may round apart in the last bit)."""

    def __init__(
        self,
        feature: bool,
        cls_pos: torch.Tensor,
        which: torch.Tensor,
        prompts: tuple[torch.Tensor, ...],
        n_classes: int,
        per_step: list[int],
    ) -> None:
        self.feature, self.cls_pos, self.which, self.prompts, self.per_step = feature, cls_pos, which, prompts, per_step
        self.n = len(which)
        self.drawn = 0  # samples replayed so far (reported, so an ablation can be checked)
        self.covers = torch.zeros(n_classes, dtype=torch.bool, device=cls_pos.device)
        self.covers[cls_pos[which]] = True
        self._ahead: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    def draw(self, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        self.drawn += m
        if not self.feature:
            pick = self._pick(m, gen)
            return self.cls_pos[pick], sample(*self.prompts, pick, gen)
        if not self._ahead:
            self._ahead.extend(self._draw_epoch(gen))
        cls, samples = self._ahead.popleft()
        if len(cls) != m:
            raise RuntimeError(f"replay drew {len(cls)} samples ahead for this step, which asks for {m}")
        return cls, samples

    def _pick(self, m: int, gen: torch.Generator) -> torch.Tensor:
        return self.which[torch.randint(self.n, (m,), generator=gen).to(self.which.device)]

    def _draw_epoch(self, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mu, L, sd = self.prompts
        picks, zs, es = [], [], []
        for m in self.per_step:  # the calls sample_features would make, step after step
            picks.append(self._pick(m, gen))
            z, e = draw_noise(m, L.shape[2], mu.shape[1], gen)
            zs.append(z)
            es.append(e)
        pick = torch.cat(picks)
        x = features_from_noise(mu, L, sd, pick, torch.cat(zs).to(mu.device), torch.cat(es).to(mu.device))
        return list(zip(self.cls_pos[pick].split(self.per_step), x.split(self.per_step)))

    def targets(self, proj: Projector) -> torch.Tensor:
        """The prompt means in the anchor space (the prototypes' targets)."""
        return proj(self.prompts[0]) if self.feature else F.normalize(self.prompts[0], dim=-1)


def replayed_count(cfg: FedAMEConfig, b: int) -> int:
    """Replayed samples in a step of b real ones."""
    return max(1, int(round(cfg.replay_ratio * b)))


@dataclass(frozen=True)
class StepInputs:
    """A client's round as its loss sees it: class anchors (seen classes, in `seen` order), the
    class positions, its samples and their positions, the projector and the mixture."""

    A: torch.Tensor
    pos: dict[int, int]
    x: torch.Tensor
    y: torch.Tensor
    proj: Projector
    moe: AnchorMoE
    frozen: bool


@dataclass
class StepLoss:
    """FedAME's loss on one minibatch of sample indices: classification and routing over the
    real and replayed samples (replayed ones class-balanced), the contrastive term to the
    anchors, the KL to the previous task's model on the old classes, and the distribution
    term to the class prompts."""

    cfg: FedAMEConfig
    inp: StepInputs
    owner_pos: torch.Tensor  # per seen class: its owner's column among all experts
    replay: Replay
    gen: torch.Generator
    real_cls: torch.Tensor  # classes whose real samples enter the classification terms
    replay_weight: float
    old_pos: torch.Tensor
    teacher_logits: torch.Tensor | None
    prompt_pos: torch.Tensor
    prompt_of: torch.Tensor
    mu: torch.Tensor
    var: torch.Tensor

    def __call__(self, xb: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
        yb, b = self.inp.y[ib], len(ib)
        y_all, weight, s_r = self.with_replay(yb, b, xb.dtype)
        u, u_all, protos = self.embed(xb, b, s_r)
        # real and replayed samples go through the mixture in one pass; per sample each
        # term is what it was
        logits_all, scores = self.inp.moe(u_all, protos)
        return self.terms(ib, yb, u, u_all, y_all, weight, logits_all, scores)

    def with_replay(self, yb: torch.Tensor, b: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Labels and weights of the real samples followed by the replayed ones; the replayed
        samples themselves (None without replay)."""
        y_all, weight, s_r = yb, self.real_cls[yb].to(dtype), None
        if self.replaying:
            m = replayed_count(self.cfg, b)
            y_r, s_r = self.replay.draw(m, self.gen)
            # class-balanced: a replayed sample weighs what a real one of an average class does
            y_all = torch.cat([yb, y_r])
            weight = torch.cat([weight, torch.full((m,), self.replay_weight * b / m, dtype=dtype, device=yb.device)])
        return y_all, weight, s_r

    @property
    def replaying(self) -> bool:
        return bool(self.replay.n) and self.cfg.replay_ratio > 0

    def embed(self, xb: torch.Tensor, b: int, s_r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One projector pass over the real samples, the replayed features and the prompt
        means: (real samples in the anchor space, real and replayed ones, class prototypes)."""
        replay, use_protos = self.replay, self.cfg.prototype_weight > 0
        parts = [xb]
        if self.replaying and replay.feature:
            parts.append(s_r)
        n_real = sum(len(p) for p in parts)
        if use_protos and replay.feature and len(replay.cls_pos):
            parts.append(replay.prompts[0])
        out = self.inp.proj(torch.cat(parts)) if len(parts) > 1 else self.inp.proj(xb)
        u = out[:b]
        u_all = out[:n_real] if not self.replaying or replay.feature else torch.cat([u, s_r])
        protos = None
        if use_protos:
            target = out[n_real:] if replay.feature else replay.targets(self.inp.proj)
            protos = prototypes(self.inp.A, self.cfg.prompt_radius, replay.cls_pos, target)
        return u, u_all, protos

    def terms(self, ib, yb, u, u_all, y_all, weight, logits_all, scores) -> torch.Tensor:
        """The weighted sum of the loss terms (each term's weight from `lambdas`)."""
        cfg, lam, A, frozen = self.cfg, self.cfg.lambdas, self.inp.A, self.inp.frozen
        n = max(float(weight.sum()), 1.0)
        ce = (F.cross_entropy(logits_all, y_all, reduction="none") * weight).sum()
        route_l = (routing_loss(scores, self.owner_pos[y_all], "none") * weight).sum()
        loss = ce / n + lam.route * route_l / n
        if lam.contrast > 0 and not frozen:
            if cfg.contrast_samples == "real":
                loss = loss + lam.contrast * contrastive_loss(u, A, yb, cfg.contrast_temperature)
            else:
                con = contrastive_loss(u_all, A, y_all, cfg.contrast_temperature, reduction="none")
                loss = loss + lam.contrast * (con * weight).sum() / n
        if self.teacher_logits is not None:
            logits = logits_all[: len(ib)]
            loss = loss + lam.forget * distillation(logits.index_select(1, self.old_pos), self.teacher_logits[ib], cfg.kd_temperature)
        if lam.dist > 0 and len(self.prompt_pos) and not frozen:
            has = torch.nonzero(self.prompt_of[yb] >= 0).flatten()
            if len(has):
                k = self.prompt_of[yb[has]]  # index_select: its backward is an index_add, not an index_put
                loss = loss + lam.dist * distribution_loss(u.index_select(0, has), self.mu[k], self.var[k])
        return loss


class FedAMEClient(Client):
    config: FedAMEConfig

    def __init__(self, config: FedAMEConfig, env: MethodEnv) -> None:
        super().__init__(config, env)
        self._teacher_memo: dict[tuple[int, int], tuple[bytes, torch.Tensor]] = {}  # (client, task) -> (inputs' digest, logits)

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        a, dev = payload.arrays, ctx.device
        A = t(a["class_anchors"], dev)  # seen classes x d, in `seen` order
        pos = {int(c): i for i, c in enumerate(a["seen"])}
        y = torch.tensor([pos[int(c)] for c in np.asarray(data.y)], dtype=torch.long, device=dev)
        x = as_tensor(data.x, dev, torch.float32)
        frozen = bool(a["proj_frozen"])
        proj = self._projector(a, "proj.", A.shape[1], dev)
        proj.requires_grad_(not frozen)
        moe = build_moe(self.config, a, "", A)
        own = replace(
            ctx.train,
            optimizer=self.config.optimizer or ctx.train.optimizer,
            lr=self.config.lr or ctx.train.lr,
            batch_size=self.config.batch_size or ctx.train.batch_size,
        )
        step = self._step_loss(a, data, ctx, StepInputs(A, pos, x, y, proj, moe, frozen), own.batch_size)
        params = [*([] if frozen else proj.parameters()), *moe.parameters()]
        # minibatches of sample indices: the loss looks up labels and cached teacher logits
        loss = train_epochs(params, x, torch.arange(len(y), device=dev), replace(ctx, train=own), step, step.gen)
        return self._update(a, proj, moe, frozen, x, y, len(pos), loss, meta={"client_id": data.client_id, "replayed": step.replay.drawn})

    def _step_loss(self, a: dict[str, np.ndarray], data: ClientData, ctx: TrainContext, inp: StepInputs, batch_size: int) -> StepLoss:
        """The minibatch loss of this client's round: its replay source, the weights of real
        and replayed samples, the teacher's logits, the prompts the distribution term uses."""
        cfg, dev, pos, y = self.config, ctx.device, inp.pos, inp.y
        old_pos = t(a["old_pos"], dev)
        prompt_pos = t(np.array([pos[int(c)] for c in a["prompt_classes"]], dtype=np.int64), dev)
        prompt_of = torch.full((len(pos),), -1, dtype=torch.long, device=dev)
        prompt_of[prompt_pos] = torch.arange(len(prompt_pos), device=dev)
        is_old = torch.zeros(len(pos), dtype=torch.bool, device=dev)
        is_old[old_pos] = True
        per_step = [replayed_count(cfg, min(batch_size, len(y) - i)) for i in range(0, len(y), batch_size)]
        replay = self._replay_source(a, pos, is_old, dev, per_step)
        # classes whose real samples enter the classification terms
        real_cls = ~replay.covers if cfg.replay_classes == "seen" else torch.ones(len(pos), dtype=torch.bool, device=dev)
        client_classes = max(1, int(((torch.bincount(y, minlength=len(pos)) > 0) & real_cls).sum()))
        has_teacher = cfg.lambdas.forget > 0 and len(old_pos) > 0 and len(a.get("teacher.held", ())) > 0
        teacher = self._teacher_logits(a, inp.x, inp.A, old_pos, replay, (data.client_id, ctx.task)) if has_teacher else None
        return StepLoss(
            cfg, inp, t(a["owner_pos"], dev), replay, torch_generator(ctx.seed), real_cls,
            replay.n / client_classes if cfg.balanced_replay else cfg.replay_ratio, old_pos, teacher,
            prompt_pos, prompt_of, t(a["prompt_mu"], dev), t(a["prompt_var"], dev),
        )  # fmt: skip

    def _teacher_logits(
        self, a: dict[str, np.ndarray], x: torch.Tensor, A: torch.Tensor, old_pos: torch.Tensor, replay: Replay, key: tuple[int, int]
    ) -> torch.Tensor:
        """The previous task's model's logits over the old classes on this client's samples.

        Within a task the teacher, the anchors and a client's samples do not change, and the
        prompts change only when the task's first feature reports arrive, so a worker keeps
        a client's logits and reuses them while their inputs stay the same (from its third
        round of the task on, when every client reports in the first). The memo is keyed by
        (client, task) and checked against a digest of every payload array the logits are
        computed from: an input that changed is computed afresh, never served stale. Every
        prompt's mean is an input, not only the old classes': the prototypes come from one
        product over all of them, and a product's rows can round differently with their
        number."""
        mu_key = ("fp_mu", "fp_classes") if replay.feature else ("prompt_mu", "prompt_classes")
        inputs = [a[k] for k in sorted(a) if k.startswith("teacher.")]
        inputs += [a["seen"], a["old_pos"], a["class_anchors"], a[mu_key[0]], a[mu_key[1]], np.array([len(x)])]
        h = hashlib.sha1()  # a cache key, not a security boundary
        for v in inputs:
            v = np.ascontiguousarray(v)
            h.update(f"{v.dtype.str}{v.shape}".encode())
            h.update(v)
        digest = h.digest()
        memo = self._teacher_memo.get(key)
        if memo is not None and memo[0] == digest:
            return memo[1]
        cfg = self.config
        teacher = build_moe(cfg, a, "teacher.", A[old_pos])
        teacher_proj = self._projector(a, "teacher.proj.", A.shape[1], A.device)
        with torch.no_grad():
            t_protos = None
            if cfg.prototype_weight > 0:
                t_protos = prototypes(A, cfg.prompt_radius, replay.cls_pos, replay.targets(teacher_proj))[old_pos]
            logits = torch.cat([teacher(teacher_proj(x[i : i + 8192]), t_protos)[0] for i in range(0, len(x), 8192)])
        self._teacher_memo = {k: v for k, v in self._teacher_memo.items() if k[1] == key[1]}  # this task's only
        self._teacher_memo[key] = (digest, logits)
        return logits

    def _projector(self, a: dict[str, np.ndarray], prefix: str, dim: int, dev: str) -> Projector:
        """The projector of a payload (the current one, or the teacher's), on `dev`."""
        return module_from_arrays(lambda: Projector(self.env.feature_dim, dim, self.config.projector_hidden), a, prefix, dev)

    def _update(
        self,
        a: dict[str, np.ndarray],
        proj: Projector,
        moe: AnchorMoE,
        frozen: bool,
        x: torch.Tensor,
        y: torch.Tensor,
        n_seen: int,
        loss: float,
        meta: dict[str, Any],
    ) -> ClientUpdate:
        """What the client sends: its trained arrays (projector unless frozen, router, scale, its
        experts), per-class statistics of its projected features, the backbone-feature report
        once per task, and how many of its samples trained each expert."""
        with torch.no_grad():
            counts, sums, sumsq = class_statistics(proj(x), y, n_seen)
        arrays = {} if frozen else module_arrays(proj, "proj.")
        arrays.update(module_arrays(moe.router, "router."))
        arrays["log_scale"] = moe.log_scale.detach().cpu().numpy().copy()
        for e, ex in zip(a["held"], moe.experts):
            arrays.update(tensor_arrays(ex, f"expert.{int(e)}."))
        have = np.flatnonzero(counts > 0)  # statistics of the classes this client holds, only
        arrays.update({"stat_pos": have, "stat_count": counts[have], "stat_sum": sums[have], "stat_sumsq": sumsq[have]})
        if bool(a.get("want_feature_stats", False)):  # features are frozen: once per client per task
            arrays.update(client_report(x, y, n_seen, self.config.prompt_rank))
        samples_per_expert = {int(e): 0 for e in a["held"]}
        all_ids = a["all_experts"]
        for c_pos, n_c in enumerate(counts):
            owner = int(all_ids[int(a["owner_pos"][c_pos])])
            if n_c > 0 and owner in samples_per_expert:
                samples_per_expert[owner] += int(n_c)
        return ClientUpdate(arrays=arrays, meta={"expert_samples": samples_per_expert, **meta}, num_samples=len(y), loss=loss)

    def _replay_source(self, a: dict[str, np.ndarray], pos: dict[int, int], is_old: torch.Tensor, dev: str, per_step: list[int]) -> Replay:
        """The prompts this client replays (none with replay off), `per_step` samples per step."""
        cfg = self.config
        feature = cfg.prompt_space == "feature"
        classes = a["fp_classes"] if feature else a["prompt_classes"]
        cls_pos = t(np.array([pos[int(c)] for c in classes], dtype=np.int64), dev)
        chosen = torch.ones(len(cls_pos), dtype=torch.bool, device=dev) if cfg.replay_classes == "seen" else is_old[cls_pos]
        which = torch.nonzero(chosen).flatten() if cfg.replay else torch.zeros(0, dtype=torch.long, device=dev)
        prompts = (
            (t(a["fp_mu"], dev), t(a["fp_L"], dev), t(a["fp_sd"], dev)) if feature else (t(a["prompt_mu"], dev), t(a["prompt_var"], dev))
        )
        return Replay(feature, cls_pos, which, prompts, len(pos), per_step)


# ------------------------------------------------------------------------------ server


@register
class FedAME(Server):
    name = "fedame"
    summary = "FedAME: anchor-guided mixture of experts, LLM expert decisions, distribution-prompt replay"
    Config = FedAMEConfig
    ClientClass = FedAMEClient
    extra_tables = {"decisions": records.DECISIONS}
    summary_columns = records.SUMMARY_COLUMNS
    worker_env = ("DEEPSEEK_", "OPENAI_")  # the LLM client's settings (and whatever llm.api_key_env names)
    run_flags = (records.REQUIRE_LLM,)
    config: FedAMEConfig

    @classmethod
    def summarize(cls, extra: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        return records.decision_counts(extra.get("decisions", []))

    @classmethod
    def run_line(cls, summary: dict[str, Any]) -> str | None:
        return records.decision_line(summary)

    @classmethod
    def figures(cls, rounds, extra):
        from fedame.figures import expert_pool_figure

        return expert_pool_figure(rounds, extra.get("decisions"))

    @classmethod
    def preflight(cls, config: FedAMEConfig, dataset: Any, cache_dir: Any) -> None:
        names = list(dataset.class_names)
        class_anchors(config.anchors, names, Path(cache_dir))  # fails fast when unavailable; cached for the runs
        if config.clusters.source == "config" or (config.clusters.source == "auto" and config.clusters.groups):
            config_clusters(config.clusters.groups or {}, names)
        if config.llm.required:
            if config.decisions != "llm" or not config.llm.enabled:
                raise LLMRequiredError("methods.fedame.llm.required needs decisions: llm and llm.enabled: true")
            if not os.environ.get(config.llm.api_key_env):
                raise LLMRequiredError(
                    f"methods.fedame.llm.required: ${config.llm.api_key_env} is not set; export the key or drop --require-llm"
                )
        if config.clusters.source == "superclasses" and dataset.superclasses is None:
            raise AnchorError(f"clusters.source=superclasses: {dataset.name} has no superclasses; use kmeans or config")

    @classmethod
    def inputs(cls, config: FedAMEConfig) -> list[Input]:
        anchors = anchors_input(config.anchors)
        return [anchors] if anchors else []

    @classmethod
    def identity(cls, config: FedAMEConfig) -> dict[str, Any]:
        """Whether an LLM can decide changes the numbers: a keyed rerun is a new run."""
        llm = config.llm
        if config.decisions == "llm" and llm.enabled and os.environ.get(llm.api_key_env):
            return {"llm": f"{llm.base_url}|{llm.model}"}
        return {}

    # -------------------------------------------------------------- setup and decisions
    def setup(self) -> None:
        cfg, env = self.config, self.env
        names = list(env.class_names)
        cache = Path(env.cache_dir) if env.cache_dir else None
        self.anchors = class_anchors(cfg.anchors, names, cache)
        self.dm = DecisionMaker(cfg.llm, cfg.rule, env.class_names, self.anchors, cache, use_llm=cfg.decisions == "llm")
        self.cluster_of = self._clusters(names)
        self.dm.cluster_of = self.cluster_of
        self.pool = ExpertPool(self.anchors, cfg.expert_hidden, env.run_seed)
        self.proj = build_projector(cfg, env, self.anchors.shape[1])
        self.router = RouterHead(self.anchors.shape[1], cfg.router_map)
        self.log_scale = np.array(np.log(cfg.init_scale), dtype=np.float32)
        self.prompts = PromptBank(self.anchors, cfg.prompt_radius)
        self.feature_prompts = FeaturePromptBank(cfg.prompt_rank)
        self.feature_reports: dict[int, dict[str, np.ndarray]] = {}  # this task's, per client
        self.seen: list[int] = []
        self.old: list[int] = []
        self.teacher: dict[str, np.ndarray] = {}
        self._teacher_experts: dict[str, np.ndarray] = {}
        self.client_classes: dict[int, tuple[int, ...]] = {}
        self.decision_rows: list[dict[str, Any]] = []
        self.task = -1
        self._shared: dict[str, np.ndarray] | None = None

    def _clusters(self, names: list[str]) -> list[int] | None:
        c = self.config.clusters
        k = c.k or int(np.ceil(np.sqrt(len(names))))
        if c.source == "config" or (c.source == "auto" and c.groups):
            return config_clusters(c.groups or {}, names)
        if c.source in ("superclasses", "auto") and self.env.superclasses is not None:
            return list(self.env.superclasses)
        if c.source == "llm":
            asked = ask_clusters(self.dm, names, k)
            if asked is not None:
                return asked
        return kmeans_clusters(self.anchors, k, seed=self.env.run_seed)

    def begin_task(self, task: TaskInfo) -> None:
        self.task = task.index
        self.old = list(self.seen)
        for c in task.classes:
            self._place(c)
        self.seen = list(task.seen_classes)
        self.client_classes = task.client_classes
        self.feature_prompts.settle()
        self.feature_reports = {}
        self._shared = None

    def _place(self, c: int) -> None:
        if self.config.single_expert:
            e = self.pool.alive[0] if self.pool.alive else self.pool.new_expert(parent=None)
            d = Decision("assign", e, "fixed", 0.0, None, "single shared expert (ablation)")
        else:
            d = self.dm.decide(c, self.pool.views())
        owner = self.pool.apply(d, c)
        self.decision_rows.append(
            {
                "task": self.task,
                "class_id": c,
                "class_name": self.env.class_names[c],
                "action": d.action,
                "expert": owner,
                "source": d.source,
                "latency_s": d.latency_s,
                "response_digest": d.response_digest,
                "reason": d.reason,
                "fallback": d.fallback,
            }
        )

    # -------------------------------------------------------------- rounds
    @property
    def projector_frozen(self) -> bool:
        after = self.config.freeze_projector_after
        return after is not None and self.task > after

    def _shared_arrays(self) -> dict[str, np.ndarray]:
        """What every client receives this round (built once per round, shared by reference)."""
        if self._shared is None:
            seen = np.asarray(self.seen, dtype=np.int64)
            pos = {c: i for i, c in enumerate(self.seen)}
            alive = self.pool.alive
            where = {e: i for i, e in enumerate(alive)}
            self._shared = {
                **module_arrays(self.proj, "proj."),
                "proj_frozen": np.array(self.projector_frozen),
                **module_arrays(self.router, "router."),
                "log_scale": self.log_scale,
                "seen": seen,
                "class_anchors": self.anchors[seen],
                "old_pos": np.asarray([pos[c] for c in self.old], dtype=np.int64),
                "all_experts": np.asarray(alive, dtype=np.int64),
                "expert_anchors": self.pool.expert_anchors(alive),
                "owner_pos": np.asarray([where[self.pool.owner[c]] for c in self.seen], dtype=np.int64),
                **self.prompts.arrays(self.seen),
                **(self.feature_prompts.arrays(self.seen, self.env.feature_dim) if self.config.prompt_space == "feature" else {}),
                **self.teacher,
            }
        return self._shared

    def held_experts(self, client_id: int) -> list[int]:
        if self.config.download_all_experts:
            return self.pool.alive
        return sorted({self.pool.owner[c] for c in self.client_classes.get(client_id, ())})

    def payload_for(self, client_id: int) -> Message:
        held = self.held_experts(client_id)
        arrays = dict(self._shared_arrays())
        where = {e: i for i, e in enumerate(self.pool.alive)}
        arrays["held"] = np.asarray(held, dtype=np.int64)
        # features are frozen: one report per client per task describes its data for good
        arrays["want_feature_stats"] = np.array(self.config.prompt_space == "feature" and client_id not in self.feature_reports)
        arrays["held_pos"] = np.asarray([where[e] for e in held], dtype=np.int64)
        for e in held:
            arrays.update({f"expert.{e}.{k}": v for k, v in self.pool.params[e].items()})
        if self.teacher:
            t_alive = [int(e) for e in self.teacher["teacher.all_experts"]]
            t_where = {e: i for i, e in enumerate(t_alive)}
            t_held = [e for e in held if e in t_where]
            arrays["teacher.held"] = np.asarray(t_held, dtype=np.int64)
            arrays["teacher.held_pos"] = np.asarray([t_where[e] for e in t_held], dtype=np.int64)
            arrays.update({k: v for k, v in self._teacher_experts.items() if int(k.split(".")[2]) in t_held})
        return Message(arrays)

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        keys = [k for k in updates[0].arrays if k.startswith(("proj.", "router."))] + ["log_scale"]
        shared = self.combine(updates, keys, reference=self._shared_arrays())  # what this round's clients started from
        if not self.projector_frozen:
            load_module_arrays(self.proj, shared, "proj.")
        load_module_arrays(self.router, shared, "router.")
        self.log_scale = shared["log_scale"]
        for e in self.pool.alive:  # per expert, weighted by the samples that trained it
            carriers = [u for u in updates if f"expert.{e}.fc1.weight" in u.arrays]
            weights = [max(u.meta["expert_samples"].get(e, 0), 0) for u in carriers]
            if not carriers or sum(weights) == 0:
                continue
            keys = [k for k in carriers[0].arrays if k.startswith(f"expert.{e}.")]
            avg = self.combine(carriers, keys, weights, reference={f"expert.{e}.{k}": v for k, v in self.pool.params[e].items()})
            self.pool.params[e] = {k.removeprefix(f"expert.{e}."): v for k, v in avg.items()}
        n = len(self.seen)
        stats = [sum(scatter_rows(u.arrays["stat_pos"], u.arrays[k], n) for u in updates) for k in ("stat_count", "stat_sum", "stat_sumsq")]
        self.prompts.update(np.asarray(self.seen), *stats)
        fresh = [u for u in updates if "fp_count" in u.arrays]
        for u in fresh:
            self.feature_reports[int(u.meta["client_id"])] = {
                k: scatter_rows(u.arrays["fp_pos"], v, n) for k, v in u.arrays.items() if k.startswith("fp_") and k != "fp_pos"
            }
        if fresh:  # only the classes in this task's data: other prompts were final when their task ended
            present = set().union(*self.client_classes.values())
            current = [i for i, c in enumerate(self.seen) if c in present]
            reports = [{k: v[current] for k, v in r.items()} for r in self.feature_reports.values()]
            self.feature_prompts.update(np.asarray(self.seen)[current], reports)
        self._shared = None

    def end_task(self) -> None:
        alive = self.pool.alive
        self.teacher = {
            **{f"teacher.{k}": v for k, v in module_arrays(self.proj, "proj.").items()},
            **{f"teacher.{k}": v for k, v in module_arrays(self.router, "router.").items()},
            "teacher.log_scale": np.array(self.log_scale, copy=True),
            "teacher.all_experts": np.asarray(alive, dtype=np.int64),
            "teacher.expert_anchors": self.pool.expert_anchors(alive),
        }
        self._teacher_experts = {f"teacher.expert.{e}.{k}": v.copy() for e in alive for k, v in self.pool.params[e].items()}

    # -------------------------------------------------------------- evaluation
    def predict(self, x: np.ndarray, mixture: bool = True, gaussian: bool | None = None) -> np.ndarray:
        """Seen class of each row: argmax of the mixture's logits plus the prompts' Gaussian
        scores (when `gaussian_weight` > 0). `mixture` / `gaussian` switch either part off
        (the diagnosis measures each alone; the Gaussian alone needs feature prompts)."""
        gaussian = self.config.gaussian_weight > 0 if gaussian is None else gaussian
        parts = []
        if mixture:
            alive = self.pool.alive
            arrays = {f"expert.{e}.{k}": v for e in alive for k, v in self.pool.params[e].items()}
            moe = AnchorMoE(
                self.config,
                self.router,
                load_experts(arrays, np.asarray(alive), ""),
                list(range(len(alive))),
                t(self.pool.expert_anchors(alive)),
                t(self.anchors[self.seen]),
                t(self.log_scale),
            )
            protos = self.class_prototypes()
            parts.append(lambda xb: moe(self.proj(xb), protos)[0])
        if gaussian:
            parts.append(self.gaussian_scores(self.config.gaussian_weight or 1.0))
        idx = batched_argmax(lambda xb: sum(p(xb) for p in parts), x)
        return np.asarray(self.seen)[idx]

    def gaussian_scores(self, weight: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> (n, seen) weighted prompt log-likelihoods (-weight/2 Mahalanobis distance to each
        class's feature prompt); a class without a prompt yet gets the lowest score of the row."""
        arrays = self.feature_prompts.arrays(self.seen, self.env.feature_dim)
        pos = {c: i for i, c in enumerate(self.seen)}
        cols = torch.tensor([pos[int(c)] for c in arrays["fp_classes"]], dtype=torch.long)
        mu, L, sd = t(arrays["fp_mu"]), t(arrays["fp_L"]), t(arrays["fp_sd"])

        def score(xb: torch.Tensor) -> torch.Tensor:
            d = -0.5 * weight * mahalanobis(xb, mu, L, sd, self.config.gaussian_shrink).float()
            low = d.min(1, keepdim=True).values if len(cols) else torch.zeros(len(xb), 1)
            return low.expand(len(xb), len(self.seen)).clone().index_copy_(1, cols, d)

        return score

    def replay_prompts(self) -> tuple[bool, np.ndarray, dict[str, np.ndarray]]:
        """(feature space?, classes with a prompt, their arrays): the prompts replay draws from."""
        if self.config.prompt_space == "feature":
            arrays = self.feature_prompts.arrays(self.seen, self.env.feature_dim)
            return True, arrays["fp_classes"], arrays
        arrays = self.prompts.arrays(self.seen)
        return False, arrays["prompt_classes"], arrays

    @torch.no_grad()
    def class_prototypes(self) -> torch.Tensor | None:
        if self.config.prototype_weight == 0:
            return None
        feature, classes, arrays = self.replay_prompts()
        pos = {c: i for i, c in enumerate(self.seen)}
        where = torch.tensor([pos[int(c)] for c in classes], dtype=torch.long)
        means = t(arrays["fp_mu" if feature else "prompt_mu"])
        target = self.proj(means) if feature else F.normalize(means, dim=-1)
        return prototypes(t(self.anchors[self.seen]), self.config.prompt_radius, where, target)

    def stats(self) -> dict[str, float]:
        return {"experts_alive": len(self.pool.alive)}

    def extra_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {"decisions": list(self.decision_rows)}
