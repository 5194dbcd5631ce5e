"""Joint training: the upper bound of the table, not a federated method.

Clients upload their current-task features and labels (the bytes columns count that
upload); after each task the server trains the same head as FedAvg centrally on the
pooled training data of every class seen so far. Nothing is forgotten by construction,
so the gap between a method and this row is what federation and incremental arrival cost.

The table's strongest classifiers are not linear heads: FeCAM scores shrunk class
Gaussians, and FedAME adds its prompts' Gaussian log-likelihoods to its logits. So the
bound fits both forms centrally and adds them (`gaussian_weight`, as FedAME does): head
logits - w/2 x FeCAM's Mahalanobis distance on the pooled data. gaussian_weight 0 is the
head alone (the bound of the linear-head methods).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from baselines.fecam import FeCAMConfig, class_gaussian, distances, transform
from baselines.head import HeadConfig, build_head
from baselines.statistics import StatisticsServer, statistics_report
from bench.api import Client, ClientData, ClientUpdate, Message, TaskInfo, TrainContext, derive_seed, register
from bench.training import batched_argmax, class_mask, masked_logits, torch_generator, train_epochs


class JointConfig(HeadConfig):
    epochs: int = Field(10, ge=1)  # passes over the pooled data after each task
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    gaussian_weight: float = Field(1.0, ge=0)  # 0: the head alone
    gaussian: FeCAMConfig = FeCAMConfig()  # transform and shrinkage of the class Gaussians


class JointClient(Client):
    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        arrays = {"x": np.asarray(data.x, dtype=np.float32), "y": np.asarray(data.y, dtype=np.int64)}
        return statistics_report(arrays, data)


@register
class Joint(StatisticsServer):
    name = "joint"
    summary = "Joint (reference): FedAvg's head trained centrally on the pooled data of all seen classes"
    Config = JointConfig
    ClientClass = JointClient
    config: JointConfig

    def setup(self) -> None:
        super().setup()
        self.model = build_head(self.config, self.env)
        self.task = -1
        self.gaussians: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # class -> (mean, precision)

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.task = task.index

    def current(self) -> dict[str, np.ndarray]:
        """Pooled data: earlier tasks' and this task's latest upload of every client."""
        parts = ([self.totals] if self.totals else []) + [self.reports[k] for k in sorted(self.reports)]
        return {k: np.concatenate([p[k] for p in parts]) for k in ("x", "y")} if parts else {}

    def refit(self, stats: dict[str, np.ndarray]) -> None:
        cfg = self.config
        self.model = build_head(cfg, self.env)
        train = replace(self.env.train, local_epochs=cfg.epochs, optimizer=cfg.optimizer, lr=cfg.lr)
        ctx = TrainContext(self.env.run_seed, self.task, 0, 0, train)
        seen = torch.from_numpy(self.seen)
        # a canonical order of the pooled samples, so the result does not depend on the partition
        key = stats["x"].astype(np.float64) @ np.linspace(1.0, 2.0, stats["x"].shape[1])
        order = np.lexsort((key, stats["y"]))
        x, y = torch.from_numpy(stats["x"][order]), torch.from_numpy(stats["y"][order])

        mask = class_mask(seen, self.env.num_classes, "cpu")

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.model(xb) + mask, yb)

        train_epochs(self.model.parameters(), x, y, ctx, loss_fn, torch_generator(derive_seed(self.env.run_seed, "joint", self.task)))
        if cfg.gaussian_weight > 0:
            # classes with data in this task's reports; earlier classes' pooled data, and so
            # their Gaussians, did not change
            fresh = np.unique(np.concatenate([r["y"] for r in self.reports.values()]))
            q = transform(stats["x"], cfg.gaussian.tukey_beta)
            for c in fresh.tolist():
                xc = q[stats["y"] == c]
                if len(xc) > 1:
                    self.gaussians[c] = class_gaussian(len(xc), xc.sum(0), xc.T @ xc, cfg.gaussian)

    def predict(self, x: np.ndarray) -> np.ndarray:
        w = self.config.gaussian_weight
        if w == 0:
            seen = torch.from_numpy(self.seen)
            return batched_argmax(lambda xb: masked_logits(self.model(xb), seen), x)
        have = [c for c in self.seen.tolist() if c in self.gaussians]
        cols = torch.tensor(have, dtype=torch.long)
        means, precisions = [self.gaussians[c][0] for c in have], [self.gaussians[c][1] for c in have]

        def score(xb: torch.Tensor) -> torch.Tensor:
            out = masked_logits(self.model(xb), cols).double()
            dist = distances(transform(xb.numpy(), self.config.gaussian.tukey_beta), means, precisions)
            out[:, cols] -= 0.5 * w * torch.from_numpy(dist)
            return out

        return batched_argmax(score, x)
