"""The standard personalised baselines, each a few hooks on baselines/pfl/common.py:
Local-only, FedAvg (global model), FedAvg + fine-tuning, FedProx, FedPer, FedRep and Ditto."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from baselines.pfl.common import ExtraLoss, PFLClient, PFLServer, State, Trained, with_epochs
from baselines.pfl.model import HEAD, PFLConfig, SplitNet
from bench.api import TrainContext, register
from bench.training import as_tensor, module_arrays


def proximal(glob: State, model: SplitNet, mu: float, device: str) -> ExtraLoss:
    """(mu / 2) ||w - w_global||^2 over the model's parameters."""
    anchors = [(p, as_tensor(glob[n], device)) for n, p in model.named_parameters()]
    return lambda x, y, logits: 0.5 * mu * sum(((p - g) ** 2).sum() for p, g in anchors)


class LocalClient(PFLClient):
    def keeps(self, key: str) -> bool:
        return True


@register
class LocalOnly(PFLServer):
    name = "local_only"
    summary = "Local-only: each client trains its own model and never takes the server's"
    ClientClass = LocalClient


@register
class FedAvgPFL(PFLServer):
    name = "fedavg_pfl"
    summary = "FedAvg on the personalised track: one global model, which every client predicts with"
    deploys_global = True


class FineTuneConfig(PFLConfig):
    ft_epochs: int = Field(1, ge=1)  # epochs of fine-tuning the received global model on the client's data


class FineTuneClient(PFLClient):
    config: FineTuneConfig

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        tr = super().train_round(glob, kept, x, y, ctx)
        ft = self.model(self.received(glob, kept), ctx.device)
        self.fit(list(ft.parameters()), ft, x, y, with_epochs(ctx, self.config.ft_epochs), "finetune")
        return Trained(tr.upload, module_arrays(ft), tr.loss)


@register
class FedAvgFT(PFLServer):
    name = "fedavg_ft"
    summary = "FedAvg + fine-tuning: each client predicts with the global model fine-tuned on its data"
    Config = FineTuneConfig
    ClientClass = FineTuneClient


class ProxConfig(PFLConfig):
    mu: float = Field(0.01, ge=0)


class ProxClient(PFLClient):
    config: ProxConfig

    def extra_loss(self, glob: State, model: SplitNet, device: str) -> ExtraLoss | None:
        return proximal(glob, model, self.config.mu, device) if self.config.mu else None


@register
class FedProxPFL(PFLServer):
    name = "fedprox_pfl"
    summary = "FedProx on the personalised track: FedAvg with (mu/2)||w - w_global||^2, the global model deployed"
    Config = ProxConfig
    ClientClass = ProxClient
    deploys_global = True


class HeadKeepingClient(PFLClient):
    def keeps(self, key: str) -> bool:
        return key.startswith(HEAD)


@register
class FedPer(PFLServer):
    name = "fedper"
    summary = "FedPer: the base is federated, each client keeps its own head; both train together"
    ClientClass = HeadKeepingClient


class FedRepConfig(PFLConfig):
    head_epochs: int = Field(5, ge=1)  # epochs on the head (base frozen) before the base's epochs


def head_only(model: SplitNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's forward with the base outside autograd: the head's epochs train the head
    alone, so a backward pass through the base (most of a CNN's cost) would be thrown away."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = model.base(x)
        return model.head(features)

    return forward


class FedRepClient(HeadKeepingClient):
    config: FedRepConfig

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        model = self.model(self.received(glob, kept), ctx.device)
        self.fit(list(model.head.parameters()), head_only(model), x, y, with_epochs(ctx, self.config.head_epochs), "head")
        loss = self.fit(list(model.base.parameters()), model, x, y, ctx, "base")
        state = module_arrays(model)
        return Trained({k: v for k, v in state.items() if not self.keeps(k)}, state, loss)


@register
class FedRep(PFLServer):
    name = "fedrep"
    summary = "FedRep: the base is federated, each client keeps its head; head epochs first, then the base's"
    Config = FedRepConfig
    ClientClass = FedRepClient


class DittoConfig(PFLConfig):
    lam: float = Field(0.1, ge=0)  # the personal model's proximal pull toward the received global model


class DittoClient(PFLClient):
    config: DittoConfig

    second_model = True

    def keeps(self, key: str) -> bool:
        return True

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        w = self.model(self.arriving(glob, kept), ctx.device)
        loss = self.fit(list(w.parameters()), w, x, y, ctx, "global")
        v = self.model(self.received(glob, kept), ctx.device)
        self.fit(list(v.parameters()), v, x, y, ctx, "personal", proximal(glob, v, self.config.lam, ctx.device))
        return Trained(module_arrays(w), module_arrays(v), loss)


@register
class Ditto(PFLServer):
    name = "ditto"
    summary = "Ditto: FedAvg's global model, and a personal model trained with a proximal pull toward it"
    Config = DittoConfig
    ClientClass = DittoClient
