"""The model a FedAME payload describes: the projector into the anchor space, the anchor-routed
mixture of experts, and the class prototypes (anchor + a residual bounded by `max_residual_norm`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench.api import (
    MethodEnv,
    derive_seed,
)
from bench.training import (
    as_tensor,
    module_from_arrays,
)
from fedame.config import FedAMEConfig
from fedame.experts import EXPERT_KEYS, ExpertWeights, anchor_logits, mix
from fedame.payload import ModelPart
from fedame.router import Projector, RouterHead, route


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


def load_experts(weights: list[dict[str, np.ndarray]], device: str = "cpu", trainable: bool = False) -> list[dict[str, torch.Tensor]]:
    """Experts' weights as tensors on `device` (copies: training leaves the payload alone);
    `trainable`: leaves that require a gradient."""
    return [{k: as_tensor(np.array(w[k]), device).requires_grad_(trainable) for k in EXPERT_KEYS} for w in weights]


def on_device(a: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """A payload array as a tensor on `device` (the CPU unless said)."""
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


def build_moe(cfg: FedAMEConfig, part: ModelPart, class_anchors: torch.Tensor, trainable: bool) -> AnchorMoE | None:
    """The mixture a payload's model part describes (the current model's, trained, or the
    teacher's), on the device of `class_anchors`; none if it holds no expert."""
    if len(part.held) == 0:
        return None
    d, dev = class_anchors.shape[1], class_anchors.device
    router = module_from_arrays(lambda: RouterHead(d, cfg.router_map), part.router, "", dev)
    experts = load_experts([part.experts[int(e)] for e in part.held], dev, trainable)
    log_scale = torch.nn.Parameter(on_device(part.log_scale, dev).clone())
    return AnchorMoE(cfg, router, experts, part.held_pos.tolist(), on_device(part.expert_anchors, dev), class_anchors, log_scale)
