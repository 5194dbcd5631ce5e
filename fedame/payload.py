"""FedAME's wire format: what the server sends a client each round (`Downlink`) and what the
client sends back (`Uplink`), as typed records with one encoder and one decoder each.

Why: the wire carries a flat dict of named arrays (the ledger counts its bytes, Ray ships
it), and server and client used to spell its ~40 keys separately, so a key misspelt on one
side was silently absent on the other. Every key is spelled here, once; each side builds or
reads a record. Encoding copies nothing: an array shared by every client of a round stays
one object, which the ledger counts once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

Arrays = dict[str, np.ndarray]

TEACHER = "teacher."


def _at(prefix: str, arrays: Mapping[str, np.ndarray]) -> Arrays:
    return {prefix + k: v for k, v in arrays.items()}


def _under(prefix: str, arrays: Mapping[str, np.ndarray]) -> Arrays:
    """The arrays at `prefix`, the prefix taken off."""
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def expert_prefix(e: int) -> str:
    return f"expert.{int(e)}."


def shared_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The keys of an encoded uplink that every client trains alike (projector, router, scale):
    what the server averages over all of a round's clients."""
    return [k for k in arrays if k.startswith(("proj.", "router."))] + ["log_scale"]


def split_shared(arrays: Mapping[str, np.ndarray]) -> tuple[Arrays, Arrays, np.ndarray]:
    """The averaged `shared_keys` arrays as (projector, router, logit scale)."""
    return _under("proj.", arrays), _under("router.", arrays), arrays["log_scale"]


def expert_keys(arrays: Mapping[str, np.ndarray], e: int) -> list[str]:
    """The keys of expert `e` in an encoded uplink (none if the client does not hold it)."""
    return [k for k in arrays if k.startswith(expert_prefix(e))]


@dataclass(frozen=True)
class AnchorPrompts:
    """Anchor-space prompts of `classes`: diagonal Gaussians (mean = anchor + bounded residual)."""

    classes: np.ndarray
    mu: np.ndarray
    var: np.ndarray

    def encode(self) -> Arrays:
        return {"prompt_classes": self.classes, "prompt_mu": self.mu, "prompt_var": self.var}

    @classmethod
    def decode(cls, a: Mapping[str, np.ndarray]) -> AnchorPrompts:
        return cls(a["prompt_classes"], a["prompt_mu"], a["prompt_var"])


@dataclass(frozen=True)
class FeaturePrompts:
    """Backbone-feature prompts of `classes`: mean + low-rank factor `L` + isotropic `sd`."""

    classes: np.ndarray
    mu: np.ndarray
    L: np.ndarray
    sd: np.ndarray

    def encode(self) -> Arrays:
        return {"fp_classes": self.classes, "fp_mu": self.mu, "fp_L": self.L, "fp_sd": self.sd}

    @classmethod
    def decode(cls, a: Mapping[str, np.ndarray]) -> FeaturePrompts | None:
        return cls(a["fp_classes"], a["fp_mu"], a["fp_L"], a["fp_sd"]) if "fp_classes" in a else None


@dataclass(frozen=True)
class ModelPart:
    """A routed model as sent: projector and router weights, logit scale, the ids and anchors
    of every alive expert (in the router's score order), and the experts held (`held`, at
    score columns `held_pos`) with their weights."""

    proj: Arrays
    router: Arrays
    log_scale: np.ndarray
    all_experts: np.ndarray
    expert_anchors: np.ndarray
    held: np.ndarray
    held_pos: np.ndarray
    experts: dict[int, Arrays]

    def encode(self, prefix: str = "") -> Arrays:
        arrays = {
            **_at("proj.", self.proj),
            **_at("router.", self.router),
            "log_scale": self.log_scale,
            "all_experts": self.all_experts,
            "expert_anchors": self.expert_anchors,
            "held": self.held,
            "held_pos": self.held_pos,
        }
        for e, weights in self.experts.items():
            arrays.update(_at(expert_prefix(e), weights))
        return _at(prefix, arrays)

    def holding(self, ids: list[int]) -> ModelPart:
        """This model sending only the experts `ids` (alive ones, in any order)."""
        where = {int(e): i for i, e in enumerate(self.all_experts)}
        return replace(
            self,
            held=np.asarray(ids, dtype=np.int64),
            held_pos=np.asarray([where[e] for e in ids], dtype=np.int64),
            experts={e: self.experts[e] for e in ids},
        )

    @classmethod
    def decode(cls, a: Mapping[str, np.ndarray], prefix: str = "") -> ModelPart:
        a = _under(prefix, a) if prefix else a
        held = a["held"]
        experts = {int(e): _under(expert_prefix(e), a) for e in held}
        return cls(
            _under("proj.", a), _under("router.", a), a["log_scale"], a["all_experts"], a["expert_anchors"], held, a["held_pos"], experts
        )


@dataclass(frozen=True)
class Downlink:
    """One client's payload for one round.

    `seen` lists the classes seen so far; `class_anchors`, `owner_pos` (the score column of
    each class's expert) and `old_pos` (earlier tasks' classes) are in its order.
    `teacher` is the previous task's model (none in the first task)."""

    model: ModelPart
    proj_frozen: bool
    seen: np.ndarray
    class_anchors: np.ndarray
    old_pos: np.ndarray
    owner_pos: np.ndarray
    prompts: AnchorPrompts
    feature_prompts: FeaturePrompts | None
    want_feature_stats: bool
    teacher: ModelPart | None

    def encode(self) -> Arrays:
        arrays = {
            **self.model.encode(),
            "proj_frozen": np.array(self.proj_frozen),
            "seen": self.seen,
            "class_anchors": self.class_anchors,
            "old_pos": self.old_pos,
            "owner_pos": self.owner_pos,
            "want_feature_stats": np.array(self.want_feature_stats),
            **self.prompts.encode(),
        }
        if self.feature_prompts is not None:
            arrays.update(self.feature_prompts.encode())
        if self.teacher is not None:
            arrays.update(self.teacher.encode(TEACHER))
        return arrays

    @classmethod
    def decode(cls, a: Mapping[str, np.ndarray]) -> Downlink:
        return cls(
            model=ModelPart.decode({k: v for k, v in a.items() if not k.startswith(TEACHER)}),
            proj_frozen=bool(a["proj_frozen"]),
            seen=a["seen"],
            class_anchors=a["class_anchors"],
            old_pos=a["old_pos"],
            owner_pos=a["owner_pos"],
            prompts=AnchorPrompts.decode(a),
            feature_prompts=FeaturePrompts.decode(a),
            want_feature_stats=bool(a["want_feature_stats"]),
            teacher=ModelPart.decode(a, TEACHER) if f"{TEACHER}held" in a else None,
        )


@dataclass(frozen=True)
class ClassStats:
    """Count, sum and sum of squares of projected features, for the seen classes at `pos`."""

    pos: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray


@dataclass(frozen=True)
class FeatureReport:
    """A client's backbone-feature report for the seen classes at `pos` (fedame/feature_prompts.py)."""

    pos: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    factor: np.ndarray
    rest: np.ndarray


@dataclass(frozen=True)
class DriftReport:
    """How the client's samples moved around each of `classes`' prompt means (fedame/drift.py)."""

    classes: np.ndarray
    sum: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class Uplink:
    """What a client sends back: its trained weights (no projector while it is frozen), the
    experts it held, its class statistics, and the optional feature and drift reports."""

    proj: Arrays | None
    router: Arrays
    log_scale: np.ndarray
    experts: dict[int, Arrays]
    stats: ClassStats
    feature_report: FeatureReport | None = None
    drift: DriftReport | None = None

    def encode(self) -> Arrays:
        arrays = {**_at("proj.", self.proj or {}), **_at("router.", self.router), "log_scale": self.log_scale}
        for e, weights in self.experts.items():
            arrays.update(_at(expert_prefix(e), weights))
        s = self.stats
        arrays.update({"stat_pos": s.pos, "stat_count": s.count, "stat_sum": s.sum, "stat_sumsq": s.sumsq})
        if (r := self.feature_report) is not None:
            arrays.update({"fp_pos": r.pos, "fp_count": r.count, "fp_sum": r.sum, "fp_factor": r.factor, "fp_rest": r.rest})
        if (d := self.drift) is not None:
            arrays.update({"drift_classes": d.classes, "drift_sum": d.sum, "drift_weight": d.weight})
        return arrays

    @classmethod
    def decode(cls, a: Mapping[str, np.ndarray]) -> Uplink:
        ids = sorted({int(k.split(".")[1]) for k in a if k.startswith("expert.")})
        return cls(
            proj=_under("proj.", a) or None,
            router=_under("router.", a),
            log_scale=a["log_scale"],
            experts={e: _under(expert_prefix(e), a) for e in ids},
            stats=ClassStats(a["stat_pos"], a["stat_count"], a["stat_sum"], a["stat_sumsq"]),
            feature_report=FeatureReport(a["fp_pos"], a["fp_count"], a["fp_sum"], a["fp_factor"], a["fp_rest"]) if "fp_pos" in a else None,
            drift=DriftReport(a["drift_classes"], a["drift_sum"], a["drift_weight"]) if "drift_classes" in a else None,
        )
