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

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.api import (
    ClientUpdate,
    Message,
    Server,
    TaskInfo,
    register,
)
from bench.inputs import Input
from bench.training import (
    batched_argmax,
    load_module_arrays,
    module_arrays,
)
from fedame import records
from fedame.anchors import AnchorError, anchors_input, class_anchors, cluster_anchors, config_clusters, kmeans_clusters
from fedame.client import FedAMEClient
from fedame.config import FedAMEConfig
from fedame.drift import compensated
from fedame.feature_prompts import FeaturePromptBank, scatter_rows
from fedame.gaussian import mahalanobis
from fedame.llm import Decision, DecisionMaker, LLMRequiredError, ask_clusters
from fedame.model import AnchorMoE, build_projector, load_experts, on_device, prototypes
from fedame.pool import ExpertPool
from fedame.prompts import PromptBank
from fedame.router import RouterHead


@register
class FedAME(Server):
    name = "fedame"
    summary = "FedAME as designed: cluster-anchor router over experts into the CLIP anchor space, LLM expert decisions, anchor + bounded-residual prompt replay"
    Config = FedAMEConfig
    ClientClass = FedAMEClient
    extra_tables = {"decisions": records.DECISIONS}
    summary_columns = records.SUMMARY_COLUMNS
    worker_env = ("DEEPSEEK_", "OPENAI_")  # the LLM client's settings (and whatever llm.api_key_env names)
    run_flags = (records.require_llm("fedame"),)
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

        return expert_pool_figure(rounds, extra.get("decisions"), cls.name)

    @classmethod
    def preflight(cls, config: FedAMEConfig, dataset: Any, cache_dir: Any) -> None:
        names = list(dataset.class_names)
        class_anchors(config.anchors, names, Path(cache_dir))  # fails fast when unavailable; cached for the runs
        if config.clusters.source == "config" or (config.clusters.source == "auto" and config.clusters.groups):
            config_clusters(config.clusters.groups or {}, names, config.clusters.unlisted)
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
        self.decision_rows: list[dict[str, Any]] = []
        self.task = -1
        self.cluster_of = self._clusters(names)
        self.dm.cluster_of = self.cluster_of
        self.pool = ExpertPool(
            self.anchors,
            cfg.expert_hidden,
            env.run_seed,
            targets=cfg.route_targets,
            cluster_anchors=cluster_anchors(self.anchors, self.cluster_of) if self.cluster_of else None,
            cluster_of=self.cluster_of,
        )
        self.proj = build_projector(cfg, env, self.anchors.shape[1])
        self.router = RouterHead(self.anchors.shape[1], cfg.router_map)
        self.log_scale = np.array(np.log(cfg.init_scale), dtype=np.float32)
        self.prompts = PromptBank(self.anchors, cfg.max_residual_norm)
        self.feature_prompts = FeaturePromptBank(cfg.prompt_rank)
        self.feature_reports: dict[int, dict[str, np.ndarray]] = {}  # this task's, per client
        self.seen: list[int] = []
        self.old: list[int] = []
        self.teacher: dict[str, np.ndarray] = {}
        self.prompt_base: dict[int, np.ndarray] = {}
        self._teacher_experts: dict[str, np.ndarray] = {}
        self.client_classes: dict[int, tuple[int, ...]] = {}
        self._shared: dict[str, np.ndarray] | None = None

    def _clusters(self, names: list[str]) -> list[int] | None:
        c = self.config.clusters
        k = c.k or int(np.ceil(np.sqrt(len(names))))
        if c.source == "config" or (c.source == "auto" and c.groups):
            return config_clusters(c.groups or {}, names, c.unlisted)
        if c.source in ("superclasses", "auto") and self.env.superclasses is not None:
            return list(self.env.superclasses)
        if c.source == "llm":
            t0 = time.perf_counter()
            asked, source, why = ask_clusters(self.dm, names, k)
            if asked is not None:
                self._record_clusters(k, source, time.perf_counter() - t0, f"{k} clusters from the LLM", fallback=False)
                return asked
            if self.config.llm.required:
                raise LLMRequiredError(f"methods.{self.name}.llm.required: {why} (clusters); check {self.config.llm.base_url}")
            self.dm.fallback_reason = self.dm.fallback_reason or str(why)
            self._record_clusters(k, "heuristic", time.perf_counter() - t0, f"{why}; k-means on the anchors instead", fallback=True)
        return kmeans_clusters(self.anchors, k, seed=self.env.run_seed)

    def _record_clusters(self, k: int, source: str, latency: float, reason: str, fallback: bool) -> None:
        """The clustering as a row of the decisions table (class -1): where it came from."""
        self.decision_rows.append(
            {"task": -1, "class_id": -1, "class_name": f"({k} clusters)", "action": "clusters", "expert": None, "source": source,
             "latency_s": latency, "response_digest": None, "reason": reason, "fallback": fallback}
        )  # fmt: skip

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
            e = self.pool.alive[0] if self.pool.alive else self.pool.new_expert(parent=None, for_class=c)
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
        self._compensate_drift(updates)
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

    def _compensate_drift(self, updates: list[ClientUpdate]) -> None:
        """`prompt_drift: sdc`: old classes' prompt means moved by this round's pooled drift
        estimate, from the means their task ended with (fedame/drift.py)."""
        reports = [u.arrays for u in updates if "drift_sum" in u.arrays]
        if not reports:
            return
        classes = reports[0]["drift_classes"]
        sums = sum(r["drift_sum"] for r in reports)
        weights = sum(r["drift_weight"] for r in reports)
        base = np.stack([self.prompt_base[int(c)] for c in classes])
        for c, mean in zip(classes, compensated(base, sums, weights)):
            self.prompts.move_to(int(c), mean)

    def end_task(self) -> None:
        self.prompt_base = {c: self.prompts.mean(c).copy() for c in self.prompts.residual}  # drift is measured from here
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
                on_device(self.pool.expert_anchors(alive)),
                on_device(self.anchors[self.seen]),
                on_device(self.log_scale),
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
        mu, L, sd = on_device(arrays["fp_mu"]), on_device(arrays["fp_L"]), on_device(arrays["fp_sd"])

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
        means = on_device(arrays["fp_mu" if feature else "prompt_mu"])
        target = self.proj(means) if feature else F.normalize(means, dim=-1)
        return prototypes(on_device(self.anchors[self.seen]), self.config.max_residual_norm, where, target)

    def stats(self) -> dict[str, float]:
        return {"experts_alive": len(self.pool.alive)}

    def extra_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {"decisions": list(self.decision_rows)}
