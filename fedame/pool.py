"""The expert pool the server holds: each expert's parameters, the classes it owns and the
anchor the router scores it by.

Every class is owned by exactly one expert. Decisions (assign / new_expert / split) are
applied here; a new expert starts from its parent's parameters (the most similar expert),
and a split copies the expert and divides its classes between the two copies by anchor
similarity (farthest-pair seeding: deterministic, no random draw).

Routing targets (`targets`): "cluster", the design's, fixes an expert's anchor when the
expert is created: the anchor of the semantic cluster it is created for (the normalised
mean of the class anchors of the cluster's whole definition), or, for a second expert the
decision maker adds to a cluster that already has one, the anchor of the class it is
created for; a split re-derives both halves' anchors from the classes each holds. Classes
joining an expert never move its anchor. "owned" scores each expert by the mean of the
class anchors it owns so far, a target that moves as classes arrive (the variant's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bench.api import derive_seed
from bench.training import module_arrays
from fedame.anchors import normalize
from fedame.experts import Expert
from fedame.llm import Decision, ExpertView


@dataclass
class ExpertPool:
    anchors: np.ndarray  # C x d class anchors
    hidden: int
    seed: int
    params: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    classes: dict[int, list[int]] = field(default_factory=dict)
    owner: dict[int, int] = field(default_factory=dict)
    next_id: int = 0
    targets: str = "cluster"  # "cluster" | "owned" (module docstring)
    cluster_anchors: np.ndarray | None = None  # K x d, with `cluster_of`
    cluster_of: list[int] | None = None  # each class's cluster
    route_anchor: dict[int, np.ndarray] = field(default_factory=dict)  # "cluster": fixed per expert

    @property
    def alive(self) -> list[int]:
        """Experts that own at least one class (the others are never routed to)."""
        return [e for e in sorted(self.classes) if self.classes[e]]

    def expert_anchor(self, e: int) -> np.ndarray:
        """The anchor the router scores expert e by."""
        if self.targets == "cluster":
            return self.route_anchor[e]
        return normalize(self.anchors[self.classes[e]].mean(0))

    def _founding_anchor(self, c: int) -> np.ndarray:
        """The routing anchor of an expert created for class c: its cluster's anchor when no
        alive expert routes by it yet, else the class's own anchor."""
        if self.cluster_anchors is None or self.cluster_of is None:
            return self.anchors[c].astype(np.float32)
        mine = self.cluster_anchors[self.cluster_of[c]].astype(np.float32)
        taken = any(np.array_equal(self.route_anchor[e], mine) for e in self.alive)
        return self.anchors[c].astype(np.float32) if taken else mine

    def expert_anchors(self, ids: list[int]) -> np.ndarray:
        return np.stack([self.expert_anchor(e) for e in ids]).astype(np.float32)

    def views(self) -> list[ExpertView]:
        return [ExpertView(e, tuple(self.classes[e]), self.expert_anchor(e)) for e in self.alive]

    def fresh_params(self, e: int) -> dict[str, np.ndarray]:
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.seed, "expert", e))
            return module_arrays(Expert(self.anchors.shape[1], self.hidden))

    def new_expert(self, parent: int | None, for_class: int | None = None) -> int:
        """A new expert (a copy of `parent`, or freshly initialised), created for `for_class`
        (its routing anchor; a split sets the halves' anchors itself)."""
        e = self.next_id
        self.next_id += 1
        src = self.params[parent] if parent is not None else self.fresh_params(e)
        self.params[e] = {k: v.copy() for k, v in src.items()}
        self.classes[e] = []
        if for_class is not None:
            self.route_anchor[e] = self._founding_anchor(for_class)
        return e

    def most_similar(self, c: int) -> int | None:
        alive = self.alive
        if not alive:
            return None
        return alive[int(np.argmax(self.expert_anchors(alive) @ self.anchors[c]))]

    def assign(self, c: int, e: int) -> None:
        old = self.owner.get(c)
        if old is not None:
            self.classes[old].remove(c)
        self.classes[e].append(c)
        self.owner[c] = e

    def split(self, e: int) -> int:
        """Divide expert e's classes in two; returns the id of the new half."""
        members = list(self.classes[e])
        if len(members) < 2:
            raise ValueError(f"expert {e} has {len(members)} class(es); nothing to split")
        a = self.anchors[members]
        sim = a @ a.T
        i, j = np.unravel_index(np.argmin(sim), sim.shape)  # the two least similar classes seed the halves
        to_new = [m for k, m in enumerate(members) if sim[k, j] > sim[k, i]]
        child = self.new_expert(parent=e)
        for m in to_new:
            self.assign(m, child)
        for half in (e, child):  # re-derived at a split, and only then
            self.route_anchor[half] = normalize(self.anchors[self.classes[half]].mean(0)).astype(np.float32)
        return child

    def apply(self, decision: Decision, c: int) -> int:
        """Apply a decision for new class c; returns the expert that now owns c."""
        if decision.action == "assign":
            target = decision.expert
        elif decision.action == "new_expert":
            target = self.new_expert(parent=self.most_similar(c), for_class=c)
        else:  # split, then join the closer half
            child = self.split(decision.expert)
            halves = [decision.expert, child]
            target = halves[int(np.argmax(self.expert_anchors(halves) @ self.anchors[c]))]
        self.assign(c, target)
        return target
