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
from dataclasses import replace
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
from fedame.feature_prompts import FeaturePromptBank, dense_report, scatter_rows
from fedame.gaussian import mahalanobis
from fedame.llm import Decision, DecisionMaker, LLMRequiredError, ask_clusters
from fedame.model import AnchorMoE, build_projector, load_experts, on_device, prototypes
from fedame.payload import (
    AnchorPrompts,
    Downlink,
    DriftReport,
    FeaturePrompts,
    ModelPart,
    Uplink,
    expert_keys,
    expert_prefix,
    shared_keys,
    split_shared,
)
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
        self.feature_reports: dict[int, dict[str, np.ndarray]] = {}  # this task's, per client, dense over `seen`
        self.seen: list[int] = []
        self.old: list[int] = []
        self.teacher: ModelPart | None = None  # the previous task's model, every expert held
        self.prompt_base: dict[int, np.ndarray] = {}
        self.client_classes: dict[int, tuple[int, ...]] = {}
        self._shared: Downlink | None = None

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

    def _model_part(self, copy: bool = False) -> ModelPart:
        """The current model with every alive expert (`copy`: a snapshot the pool's training
        does not change)."""
        alive = self.pool.alive
        experts = {e: {k: v.copy() for k, v in self.pool.params[e].items()} if copy else self.pool.params[e] for e in alive}
        return ModelPart(
            proj=module_arrays(self.proj),
            router=module_arrays(self.router),
            log_scale=np.array(self.log_scale, copy=True) if copy else self.log_scale,
            all_experts=np.asarray(alive, dtype=np.int64),
            expert_anchors=self.pool.expert_anchors(alive),
            held=np.asarray(alive, dtype=np.int64),
            held_pos=np.arange(len(alive), dtype=np.int64),
            experts=experts,
        )

    def _round_payload(self) -> Downlink:
        """What every client receives this round, every expert included (built once per round;
        its arrays are shared by reference among the clients' payloads)."""
        if self._shared is None:
            pos = {c: i for i, c in enumerate(self.seen)}
            model = self._model_part()
            where = {int(e): i for i, e in enumerate(model.all_experts)}
            feature = self.config.prompt_space == "feature"
            self._shared = Downlink(
                model=model,
                proj_frozen=self.projector_frozen,
                seen=np.asarray(self.seen, dtype=np.int64),
                class_anchors=self.anchors[self.seen],
                old_pos=np.asarray([pos[c] for c in self.old], dtype=np.int64),
                owner_pos=np.asarray([where[self.pool.owner[c]] for c in self.seen], dtype=np.int64),
                prompts=self.prompts.prompts(self.seen),
                feature_prompts=self.feature_prompts.prompts(self.seen, self.env.feature_dim) if feature else None,
                want_feature_stats=False,
                teacher=self.teacher,
            )
        return self._shared

    def held_experts(self, client_id: int) -> list[int]:
        if self.config.download_all_experts:
            return self.pool.alive
        return sorted({self.pool.owner[c] for c in self.client_classes.get(client_id, ())})

    def payload_for(self, client_id: int) -> Message:
        held = self.held_experts(client_id)
        common = self._round_payload()
        teacher = common.teacher
        if teacher is not None:
            known = set(teacher.all_experts.tolist())
            teacher = teacher.holding([e for e in held if e in known])
        down = replace(
            common,
            model=common.model.holding(held),
            # features are frozen: one report per client per task describes its data for good
            want_feature_stats=self.config.prompt_space == "feature" and client_id not in self.feature_reports,
            teacher=teacher,
        )
        return Message(down.encode())

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        ups = [Uplink.decode(u.arrays) for u in updates]
        shared = self.combine(updates, shared_keys(updates[0].arrays), reference=self._round_payload().encode())
        proj, router, self.log_scale = split_shared(shared)
        if not self.projector_frozen:
            load_module_arrays(self.proj, proj)
        load_module_arrays(self.router, router)
        for e in self.pool.alive:  # per expert, weighted by the samples that trained it
            carriers = [u for u, up in zip(updates, ups) if e in up.experts]
            weights = [max(u.meta["expert_samples"].get(e, 0), 0) for u in carriers]
            if not carriers or sum(weights) == 0:
                continue
            prefix = expert_prefix(e)
            reference = {prefix + k: v for k, v in self.pool.params[e].items()}
            avg = self.combine(carriers, expert_keys(carriers[0].arrays, e), weights, reference=reference)
            self.pool.params[e] = {k.removeprefix(prefix): v for k, v in avg.items()}
        n = len(self.seen)
        stats = [sum(scatter_rows(up.stats.pos, getattr(up.stats, k), n) for up in ups) for k in ("count", "sum", "sumsq")]
        self.prompts.update(np.asarray(self.seen), *stats)
        self._compensate_drift([up.drift for up in ups if up.drift is not None])
        fresh = [(u, up.feature_report) for u, up in zip(updates, ups) if up.feature_report is not None]
        for u, report in fresh:
            self.feature_reports[int(u.meta["client_id"])] = dense_report(report, n)
        if fresh:  # only the classes in this task's data: other prompts were final when their task ended
            present = set().union(*self.client_classes.values())
            current = [i for i, c in enumerate(self.seen) if c in present]
            reports = [{k: v[current] for k, v in r.items()} for r in self.feature_reports.values()]
            self.feature_prompts.update(np.asarray(self.seen)[current], reports)
        self._shared = None

    def _compensate_drift(self, reports: list[DriftReport]) -> None:
        """`prompt_drift: sdc`: old classes' prompt means moved by this round's pooled drift
        estimate, from the means their task ended with (fedame/drift.py)."""
        if not reports:
            return
        classes = reports[0].classes
        sums = sum(r.sum for r in reports)
        weights = sum(r.weight for r in reports)
        base = np.stack([self.prompt_base[int(c)] for c in classes])
        for c, mean in zip(classes, compensated(base, sums, weights)):
            self.prompts.move_to(int(c), mean)

    def end_task(self) -> None:
        self.prompt_base = {c: self.prompts.mean(c).copy() for c in self.prompts.residual}  # drift is measured from here
        self.teacher = self._model_part(copy=True)

    # -------------------------------------------------------------- evaluation
    def predict(self, x: np.ndarray, mixture: bool = True, gaussian: bool | None = None) -> np.ndarray:
        """Seen class of each row: argmax of the mixture's logits plus the prompts' Gaussian
        scores (when `gaussian_weight` > 0). `mixture` / `gaussian` switch either part off
        (the diagnosis measures each alone; the Gaussian alone needs feature prompts)."""
        gaussian = self.config.gaussian_weight > 0 if gaussian is None else gaussian
        parts = []
        if mixture:
            alive = self.pool.alive
            moe = AnchorMoE(
                self.config,
                self.router,
                load_experts([self.pool.params[e] for e in alive]),
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
        fp = self.feature_prompts.prompts(self.seen, self.env.feature_dim)
        pos = {c: i for i, c in enumerate(self.seen)}
        cols = torch.tensor([pos[int(c)] for c in fp.classes], dtype=torch.long)
        mu, L, sd = on_device(fp.mu), on_device(fp.L), on_device(fp.sd)

        def score(xb: torch.Tensor) -> torch.Tensor:
            d = -0.5 * weight * mahalanobis(xb, mu, L, sd, self.config.gaussian_shrink).float()
            low = d.min(1, keepdim=True).values if len(cols) else torch.zeros(len(xb), 1)
            return low.expand(len(xb), len(self.seen)).clone().index_copy_(1, cols, d)

        return score

    def replay_prompts(self) -> AnchorPrompts | FeaturePrompts:
        """The prompts replay draws from (of the seen classes that have one)."""
        if self.config.prompt_space == "feature":
            return self.feature_prompts.prompts(self.seen, self.env.feature_dim)
        return self.prompts.prompts(self.seen)

    @torch.no_grad()
    def class_prototypes(self) -> torch.Tensor | None:
        if self.config.prototype_weight == 0:
            return None
        prompts = self.replay_prompts()
        pos = {c: i for i, c in enumerate(self.seen)}
        where = torch.tensor([pos[int(c)] for c in prompts.classes], dtype=torch.long)
        means = on_device(prompts.mu)
        target = self.proj(means) if isinstance(prompts, FeaturePrompts) else F.normalize(means, dim=-1)
        return prototypes(on_device(self.anchors[self.seen]), self.config.max_residual_norm, where, target)

    def stats(self) -> dict[str, float]:
        return {"experts_alive": len(self.pool.alive)}

    def extra_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {"decisions": list(self.decision_rows)}
