"""FedAME's client: trains the experts it holds (and the projector) on its features plus replayed
samples, and reports its trained arrays and per-class feature statistics."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from bench.api import (
    Client,
    ClientData,
    ClientUpdate,
    Message,
    MethodEnv,
    TrainContext,
)
from bench.training import (
    as_tensor,
    module_arrays,
    module_from_arrays,
    tensor_arrays,
    torch_generator,
    train_epochs,
)
from fedame.config import FedAMEConfig
from fedame.drift import drift_report
from fedame.feature_prompts import client_report
from fedame.losses import StepInputs, StepLoss, replayed_count
from fedame.model import AnchorMoE, build_moe, on_device, prototypes
from fedame.payload import ClassStats, Downlink, DriftReport, ModelPart, Uplink
from fedame.prompts import class_statistics
from fedame.replay import Replay
from fedame.router import Projector


class FedAMEClient(Client):
    config: FedAMEConfig

    def __init__(self, config: FedAMEConfig, env: MethodEnv) -> None:
        super().__init__(config, env)
        self._teacher_memo: dict[tuple[int, int], tuple[bytes, torch.Tensor]] = {}  # (client, task) -> (inputs' digest, logits)

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        a, dev = Downlink.decode(payload.arrays), ctx.device
        A = on_device(a.class_anchors, dev)  # seen classes x d, in `seen` order
        pos = {int(c): i for i, c in enumerate(a.seen)}
        y = torch.tensor([pos[int(c)] for c in np.asarray(data.y)], dtype=torch.long, device=dev)
        x = as_tensor(data.x, dev, torch.float32)
        frozen = a.proj_frozen
        proj = self._projector(a.model, A.shape[1], dev)
        proj.requires_grad_(not frozen)
        moe = build_moe(self.config, a.model, A, trainable=True)
        assert moe is not None, "a training client holds the experts of its classes"
        own = replace(
            ctx.train,
            optimizer=self.config.optimizer or ctx.train.optimizer,
            lr=self.config.lr or ctx.train.lr,
            batch_size=self.config.batch_size or ctx.train.batch_size,
        )
        drift = self._drift(a, x, proj, dev) if self._compensates(a) else None
        step = self._step_loss(a, data, ctx, StepInputs(A, pos, x, y, proj, moe, frozen), own.batch_size)
        params = [*([] if frozen else proj.parameters()), *moe.parameters()]
        # minibatches of sample indices: the loss looks up labels and cached teacher logits
        loss = train_epochs(params, x, torch.arange(len(y), device=dev), replace(ctx, train=own), step, step.gen)
        meta = {"client_id": data.client_id, "replayed": step.replay.drawn}
        return self._update(a, proj, moe, x, y, loss, drift, meta)

    def _compensates(self, a: Downlink) -> bool:
        """Drift compensation applies to anchor-space prompts of old classes while the projector moves."""
        cfg = self.config
        return cfg.prompt_drift == "sdc" and cfg.prompt_space == "anchor" and not a.proj_frozen and a.teacher is not None

    def _drift(self, a: Downlink, x: torch.Tensor, proj: Projector, dev: str) -> DriftReport | None:
        """How this client's samples moved from the previous task's projector to the one received
        (before local training), around each old class's prompt mean (fedame/drift.py)."""
        assert a.teacher is not None
        pos = {int(c): i for i, c in enumerate(a.seen)}
        old = {int(p) for p in a.old_pos}
        rows = [i for i, c in enumerate(a.prompts.classes) if pos[int(c)] in old]
        if not rows:
            return None
        teacher = self._projector(a.teacher, a.class_anchors.shape[1], dev)
        with torch.no_grad():
            return drift_report(a.prompts.classes[rows], teacher(x), proj(x), on_device(a.prompts.mu[rows], dev), self.config.drift_sigma)

    def _step_loss(self, a: Downlink, data: ClientData, ctx: TrainContext, inp: StepInputs, batch_size: int) -> StepLoss:
        """The minibatch loss of this client's round: its replay source, the weights of real
        and replayed samples, the teacher's logits, the prompts the distribution term uses."""
        cfg, dev, pos, y = self.config, ctx.device, inp.pos, inp.y
        old_pos = on_device(a.old_pos, dev)
        prompt_pos = on_device(np.array([pos[int(c)] for c in a.prompts.classes], dtype=np.int64), dev)
        prompt_of = torch.full((len(pos),), -1, dtype=torch.long, device=dev)
        prompt_of[prompt_pos] = torch.arange(len(prompt_pos), device=dev)
        is_old = torch.zeros(len(pos), dtype=torch.bool, device=dev)
        is_old[old_pos] = True
        per_step = [replayed_count(cfg, min(batch_size, len(y) - i)) for i in range(0, len(y), batch_size)]
        replay = self._replay_source(a, pos, is_old, dev, per_step)
        # classes whose real samples enter the classification terms
        real_cls = ~replay.covers if cfg.replay_classes == "seen" else torch.ones(len(pos), dtype=torch.bool, device=dev)
        client_classes = max(1, int(((torch.bincount(y, minlength=len(pos)) > 0) & real_cls).sum()))
        has_teacher = cfg.lambdas.forget > 0 and len(old_pos) > 0 and a.teacher is not None and len(a.teacher.held) > 0
        teacher = self._teacher_logits(a, inp.x, inp.A, old_pos, replay, (data.client_id, ctx.task)) if has_teacher else None
        return StepLoss(
            cfg, inp, on_device(a.owner_pos, dev), replay, torch_generator(ctx.seed), real_cls,
            replay.n / client_classes if cfg.balanced_replay else cfg.replay_ratio, old_pos, teacher,
            prompt_pos, prompt_of, on_device(a.prompts.mu, dev), on_device(a.prompts.var, dev),
        )  # fmt: skip

    def _teacher_logits(
        self, a: Downlink, x: torch.Tensor, A: torch.Tensor, old_pos: torch.Tensor, replay: Replay, key: tuple[int, int]
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
        assert a.teacher is not None
        prompts = a.feature_prompts if replay.feature else a.prompts
        assert prompts is not None
        sent = a.teacher.encode()
        inputs = [sent[k] for k in sorted(sent)]
        inputs += [a.seen, a.old_pos, a.class_anchors, prompts.mu, prompts.classes, np.array([len(x)])]
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
        teacher = build_moe(cfg, a.teacher, A[old_pos], trainable=False)
        assert teacher is not None
        teacher_proj = self._projector(a.teacher, A.shape[1], A.device)
        with torch.no_grad():
            t_protos = None
            if cfg.prototype_weight > 0:
                t_protos = prototypes(A, cfg.max_residual_norm, replay.cls_pos, replay.targets(teacher_proj))[old_pos]
            logits = torch.cat([teacher(teacher_proj(x[i : i + 8192]), t_protos)[0] for i in range(0, len(x), 8192)])
        self._teacher_memo = {k: v for k, v in self._teacher_memo.items() if k[1] == key[1]}  # this task's only
        self._teacher_memo[key] = (digest, logits)
        return logits

    def _projector(self, part: ModelPart, dim: int, dev: str) -> Projector:
        """The projector of a payload's model part (the current one, or the teacher's), on `dev`."""
        return module_from_arrays(lambda: Projector(self.env.feature_dim, dim, self.config.projector_hidden), part.proj, "", dev)

    def _update(
        self,
        a: Downlink,
        proj: Projector,
        moe: AnchorMoE,
        x: torch.Tensor,
        y: torch.Tensor,
        loss: float,
        drift: DriftReport | None,
        meta: dict[str, Any],
    ) -> ClientUpdate:
        """What the client sends: its trained weights (projector unless frozen, router, scale, its
        experts), per-class statistics of its projected features, the backbone-feature report
        once per task, the drift report, and how many of its samples trained each expert."""
        n_seen = len(a.seen)
        with torch.no_grad():
            counts, sums, sumsq = class_statistics(proj(x), y, n_seen)
        have = np.flatnonzero(counts > 0)  # statistics of the classes this client holds, only
        up = Uplink(
            proj=None if a.proj_frozen else module_arrays(proj),
            router=module_arrays(moe.router),
            log_scale=moe.log_scale.detach().cpu().numpy().copy(),
            experts={int(e): tensor_arrays(ex) for e, ex in zip(a.model.held, moe.experts)},
            stats=ClassStats(have, counts[have], sums[have], sumsq[have]),
            # features are frozen: once per client per task
            feature_report=client_report(x, y, n_seen, self.config.prompt_rank) if a.want_feature_stats else None,
            drift=drift,
        )
        samples_per_expert = {int(e): 0 for e in a.model.held}
        for c_pos, n_c in enumerate(counts):
            owner = int(a.model.all_experts[int(a.owner_pos[c_pos])])
            if n_c > 0 and owner in samples_per_expert:
                samples_per_expert[owner] += int(n_c)
        return ClientUpdate(arrays=up.encode(), meta={"expert_samples": samples_per_expert, **meta}, num_samples=len(y), loss=loss)

    def _replay_source(self, a: Downlink, pos: dict[int, int], is_old: torch.Tensor, dev: str, per_step: list[int]) -> Replay:
        """The prompts this client replays (none with replay off), `per_step` samples per step."""
        cfg = self.config
        fp = a.feature_prompts if cfg.prompt_space == "feature" else None
        assert fp is not None or cfg.prompt_space == "anchor", "a server in feature space sends feature prompts"
        feature = fp is not None
        classes = fp.classes if fp is not None else a.prompts.classes
        cls_pos = on_device(np.array([pos[int(c)] for c in classes], dtype=np.int64), dev)
        chosen = torch.ones(len(cls_pos), dtype=torch.bool, device=dev) if cfg.replay_classes == "seen" else is_old[cls_pos]
        which = torch.nonzero(chosen).flatten() if cfg.replay else torch.zeros(0, dtype=torch.long, device=dev)
        prompts = (
            (on_device(fp.mu, dev), on_device(fp.L, dev), on_device(fp.sd, dev))
            if fp is not None
            else (on_device(a.prompts.mu, dev), on_device(a.prompts.var, dev))
        )
        return Replay(feature, cls_pos, which, prompts, len(pos), per_step)
