"""FedLwF: FedAvg plus Learning-without-Forgetting distillation from the previous task's
global model on the old classes' logits."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from baselines.head import HEAD, HeadClient, HeadConfig, HeadServer, LossTerm, build_head
from bench.api import Message, register
from bench.training import as_tensor, distillation, load_module_arrays, module_arrays

TEACHER = "teacher."


class FedLwFConfig(HeadConfig):
    temperature: float = Field(2.0, gt=0)
    weight: float = Field(1.0, ge=0)


class FedLwFClient(HeadClient):
    config: FedLwFConfig

    def loss_terms(self, payload: Message, model: torch.nn.Module) -> list[LossTerm]:
        old = payload.arrays.get("old")
        if old is None or len(old) == 0 or self.config.weight == 0:
            return []
        teacher = build_head(self.config, self.env, init=False)
        load_module_arrays(teacher, payload.arrays, TEACHER)
        device = next(model.parameters()).device
        teacher.to(device)
        old_t = as_tensor(old, device)
        cfg = self.config

        def lwf(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                target = teacher(x)[:, old_t]
            return cfg.weight * distillation(logits[:, old_t], target, cfg.temperature)

        return [lwf]


@register
class FedLwF(HeadServer):
    name = "fedlwf"
    summary = "FedLwF: FedAvg plus distillation from the previous task's global model on old classes"
    Config = FedLwFConfig
    ClientClass = FedLwFClient

    def setup(self) -> None:
        super().setup()
        self.teacher: dict[str, np.ndarray] = {}
        self.old = np.zeros(0, dtype=np.int64)

    def end_task(self) -> None:
        self.teacher = {TEACHER + k.removeprefix(HEAD): v for k, v in module_arrays(self.model, HEAD).items()}
        self.old = self.seen.copy()

    def extra_payload(self) -> dict[str, np.ndarray]:
        return {**self.teacher, "old": self.old} if len(self.old) else {}
