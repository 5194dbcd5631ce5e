"""FedAME's minibatch loss: CE + l1 routing + l2 contrastive + l3 KL(previous model) + l4 distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.training import (
    distillation,
)
from fedame.config import FedAMEConfig
from fedame.experts import contrastive_loss
from fedame.model import AnchorMoE, prototypes
from fedame.prompts import distribution_loss
from fedame.replay import Replay
from fedame.router import Projector, routing_loss


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
            protos = prototypes(self.inp.A, self.cfg.max_residual_norm, replay.cls_pos, target)
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
