"""FedAME's hyperparameters: its config section `methods.fedame` (docs/fedame.md explains each)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from bench.api import (
    MethodConfig,
)
from bench.config import Section
from fedame.anchors import AnchorConfig, ClusterConfig
from fedame.llm import LLMConfig, RuleConfig


class LossWeights(Section):
    route: float = Field(0.5, ge=0)  # l1
    contrast: float = Field(0.5, ge=0)  # l2
    forget: float = Field(1.0, ge=0)  # l3 (KL to the previous task's model)
    dist: float = Field(0.05, ge=0)  # l4 (distribution regulariser)


class FedAMEConfig(MethodConfig):
    """`fedame`'s defaults are the design (docs/fedame.md, "The design and its switches"):
    cluster anchors route, class anchors classify, the prompts are anchor + a residual of
    norm at most `max_residual_norm` in the anchor space, no score outside the mixture. The
    improvements are switches here, on by default only in `fedame_plus` (fedame/variant.py)."""

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
    # what the router scores experts by: "cluster", the design's (each expert's cluster anchor,
    # fixed when it is created, re-derived only at a split: fedame/pool.py), or "owned" (the
    # mean of the class anchors an expert owns so far, moving as classes arrive)
    route_targets: Literal["cluster", "owned"] = "cluster"
    top_k: int = Field(2, ge=1)
    route_temperature: float = Field(0.1, gt=0)
    contrast_temperature: float = Field(0.1, gt=0)
    kd_temperature: float = Field(2.0, gt=0)
    init_scale: float = Field(16.0, gt=0)
    lambdas: LossWeights = LossWeights()
    replay: bool = True
    # how anchor-space prompts of old classes follow the projector: "none" (the design: they
    # keep the statistics their task ended with) or "sdc" (semantic drift compensation from the
    # current task's features: fedame/drift.py); `drift_sigma` is its kernel width
    prompt_drift: Literal["none", "sdc"] = "none"
    drift_sigma: float = Field(0.3, gt=0)
    replay_ratio: float = Field(1.0, ge=0)  # replayed samples per real sample in a batch
    # where replay draws from: "feature" keeps each class's prompt as a low-rank Gaussian of
    # backbone features (frozen, so it never goes stale) and replays it through the current
    # projector; "anchor" draws from the anchor-space prompts (valid only while the projector
    # is frozen)
    prompt_space: Literal["anchor", "feature"] = "anchor"
    prompt_rank: int = Field(32, ge=0)  # covariance rank of a feature-space prompt
    # which classes the classification terms (CE, routing) learn from prompts: "old" replays
    # earlier tasks' classes next to the real data of the current ones; "seen" learns every
    # class that has a prompt from its prompt, so old and new classes are seen through the
    # same kind of sample (real data still drive the contrastive, KL and distribution terms)
    replay_classes: Literal["old", "seen"] = "old"
    # class logits = scale * (cos(expert output, class anchor) + w * cos(projected feature,
    # class prototype)); the prototype is the prompt mean, anchor + residual bounded by the
    # radius (in feature mode: the feature prompt's mean through the current projector). The
    # second term does not depend on routing. 0: anchors only (the old behaviour)
    prototype_weight: float = Field(0.0, ge=0)
    # class logits at evaluation += w * (-1/2 Mahalanobis distance to the class's feature prompt,
    # covariance shrunk by `gaussian_shrink` as FeCAM does): the log-likelihood of the prompt's
    # Gaussian, so w = 1 multiplies the mixture's class probabilities by the prompts'. The
    # prompts are exact summaries of frozen features, so this term does not forget and does not
    # depend on routing. 0: the mixture alone (needs no feature prompts)
    gaussian_weight: float = Field(0.0, ge=0)
    gaussian_shrink: float = Field(1.0, ge=0)
    # which samples the contrastive term (InfoNCE to the class anchors) sees: "replay" the same
    # samples and weights as CE (old classes through their prompts, so old and new classes are
    # pulled to their anchors alike); "real" only the current task's real samples (it sharpens
    # the current classes alone, and they are over-predicted until the next task arrives;
    # docs/fedame.md)
    contrast_samples: Literal["replay", "real"] = "real"
    balanced_replay: bool = True  # weigh replay so old and new classes count alike
    max_residual_norm: float = Field(0.5, gt=0)
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
