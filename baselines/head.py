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
from torch.func import functional_call

from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, MethodEnv, Server, TaskInfo, TrainContext, derive_seed
from bench.training import (
    ParamLossFn,
    as_tensor,
    batched_argmax,
    class_mask,
    load_module_arrays,
    masked_logits,
    module_arrays,
    torch_generator,
    train_epochs,
    train_epochs_batched,
)

LossTerm = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (params, x, y, logits) -> loss
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
        return nn.Sequential(
            nn.Linear(env.feature_dim, cfg.hidden, device=device), nn.ReLU(), nn.Linear(cfg.hidden, env.num_classes, device=device)
        )

    if not init:
        return layers("meta").to_empty(device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(env.run_seed, "head"))
        return layers()


def as_tensors(data: ClientData, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return as_tensor(data.x, device, torch.float32), as_tensor(data.y, device, torch.int64)


class HeadClient(Client):
    """Local training of the head; `local_train_batch` trains many clients of a round in one
    stacked computation (runtime.batch_clients) with each client's own data, minibatch
    order and optimiser state."""

    config: HeadConfig
    batched = True

    def loss_terms(self, payload: Message, model: nn.Module) -> list[LossTerm]:
        """Extra loss terms beside cross-entropy; none for FedAvg. A term reads the trained
        parameters from its `params` argument (the batched path trains stacked copies)."""
        return []

    def start_model(self, payload: Message, device: str) -> nn.Module:
        model = build_head(self.config, self.env, init=False)
        load_module_arrays(model, payload.arrays, HEAD)
        return model.to(device)  # before loss_terms: their tensors follow the model's device

    def head_loss(self, payload: Message, model: nn.Module, device: str, functional: bool) -> ParamLossFn:
        """(params, x, y) -> loss: cross-entropy over the seen classes plus the method's terms.
        `functional`: the head is evaluated with `params` (torch.func), not its own weights."""
        mask = class_mask(as_tensor(payload.arrays["seen"], device), self.env.num_classes, device)
        terms = self.loss_terms(payload, model)

        def loss_fn(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            logits = (functional_call(model, params, (xb,)) if functional else model(xb)) + mask
            loss = F.cross_entropy(logits, yb)
            for term in terms:
                loss = loss + term(params, xb, yb, logits)
            return loss

        return loss_fn

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        model = self.start_model(payload, ctx.device)
        loss_fn, params = self.head_loss(payload, model, ctx.device, functional=False), dict(model.named_parameters())
        x, y = as_tensors(data, ctx.device)
        loss = train_epochs(model.parameters(), x, y, ctx, lambda xb, yb: loss_fn(params, xb, yb), torch_generator(ctx.seed))
        return ClientUpdate(arrays=module_arrays(model, HEAD), num_samples=len(y), loss=loss)

    def local_train_batch(self, payload: Message, datas: list[ClientData], ctxs: list[TrainContext]) -> list[ClientUpdate]:
        """Every client of `datas` from the same payload, trained together (bench.training.train_epochs_batched)."""
        device = ctxs[0].device
        model = self.start_model(payload, device)
        loss_fn = self.head_loss(payload, model, device, functional=True)
        start = {k: v.detach() for k, v in model.named_parameters()}
        finals, losses = train_epochs_batched(start, [as_tensors(d, device) for d in datas], ctxs, loss_fn)
        return [
            ClientUpdate(arrays={HEAD + k: v.cpu().numpy() for k, v in final.items()}, num_samples=len(d.y), loss=loss)
            for final, d, loss in zip(finals, datas, losses)
        ]


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
        avg = self.combine(
            updates, [k for k in updates[0].arrays if k.startswith(HEAD)], reference=self.payload_for(0).arrays
        )  # the global model the round started from
        load_module_arrays(self.model, avg, HEAD)
        self._payload = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        seen = torch.from_numpy(self.seen)
        return batched_argmax(lambda xb: masked_logits(self.model(xb), seen), x)
