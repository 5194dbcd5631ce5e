"""A classifier head on frozen features, trained by FedAvg-style local SGD.

FedAvg, FedProx and FedLwF are this server/client pair plus, respectively, nothing, a
proximal loss term, and a distillation loss term with a teacher in the payload: each
subclass adds loss terms and payload entries instead of copying the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, MethodEnv, Server, TaskInfo, TrainContext, derive_seed
from bench.training import as_tensor, batched_argmax, class_mask, load_module_arrays, masked_logits, module_arrays, torch_generator, train_epochs

LossTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y, logits) -> loss
HEAD = "head."


class HeadConfig(MethodConfig):
    head: Literal["linear", "mlp"] = "linear"
    hidden: int = Field(256, ge=1)


def build_head(cfg: HeadConfig, env: MethodEnv, init: bool = True) -> nn.Module:
    """The head, initialised from a seed derived from the run seed (same on every worker).
    `init=False`: uninitialised memory for a head whose weights are loaded right after (a
    client's copy of the global head), without paying for the random init and reseeding."""
    def layers(device: str | None = None) -> nn.Module:
        if cfg.head == "linear":
            return nn.Linear(env.feature_dim, env.num_classes, device=device)
        return nn.Sequential(nn.Linear(env.feature_dim, cfg.hidden, device=device), nn.ReLU(),
                             nn.Linear(cfg.hidden, env.num_classes, device=device))

    if not init:
        return layers("meta").to_empty(device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(env.run_seed, "head"))
        return layers()


def as_tensors(data: ClientData, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return as_tensor(data.x, device, torch.float32), as_tensor(data.y, device, torch.int64)


class HeadClient(Client):
    config: HeadConfig

    def loss_terms(self, payload: Message, model: nn.Module) -> list[LossTerm]:
        """Extra loss terms beside cross-entropy; none for FedAvg."""
        return []

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        model = build_head(self.config, self.env, init=False)
        load_module_arrays(model, payload.arrays, HEAD)
        model.to(ctx.device)  # before loss_terms: their tensors follow the model's device
        mask = class_mask(as_tensor(payload.arrays["seen"], ctx.device), self.env.num_classes, ctx.device)
        terms = self.loss_terms(payload, model)

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            logits = model(xb) + mask
            loss = F.cross_entropy(logits, yb)
            for term in terms:
                loss = loss + term(xb, yb, logits)
            return loss

        x, y = as_tensors(data, ctx.device)
        loss = train_epochs(model.parameters(), x, y, ctx, loss_fn, torch_generator(ctx.seed))
        return ClientUpdate(arrays=module_arrays(model, HEAD), num_samples=len(y), loss=loss)


class HeadServer(Server):
    Config = HeadConfig
    ClientClass = HeadClient
    config: HeadConfig

    def setup(self) -> None:
        self.model = build_head(self.config, self.env)
        self.seen = np.zeros(0, dtype=np.int64)
        self._payload: Message | None = None

    def begin_task(self, task: TaskInfo) -> None:
        self.seen = np.asarray(task.seen_classes, dtype=np.int64)
        self._payload = None

    def extra_payload(self) -> dict[str, np.ndarray]:
        """Arrays a subclass sends beside the head (e.g. a teacher)."""
        return {}

    def payload_for(self, client_id: int) -> Message:
        # every client gets the same object: built once per round, shipped once by Ray
        if self._payload is None:
            self._payload = Message({**module_arrays(self.model, HEAD), "seen": self.seen, **self.extra_payload()})
        return self._payload

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        avg = self.combine(updates, [k for k in updates[0].arrays if k.startswith(HEAD)], reference=self.payload_for(0).arrays)  # the global model the round started from
        load_module_arrays(self.model, avg, HEAD)
        self._payload = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        seen = torch.from_numpy(self.seen)
        return batched_argmax(lambda xb: masked_logits(self.model(xb), seen), x)
