"""FedProx (Li et al., 2020): FedAvg plus (mu/2)·||w - w_global||² in local training."""

from __future__ import annotations

import torch
from pydantic import Field

from baselines.head import HEAD, HeadClient, HeadConfig, HeadServer, LossTerm
from bench.api import Message, register
from bench.training import as_tensor


class FedProxConfig(HeadConfig):
    mu: float = Field(0.01, ge=0)


class FedProxClient(HeadClient):
    config: FedProxConfig

    def loss_terms(self, payload: Message, model: torch.nn.Module) -> list[LossTerm]:
        if self.config.mu == 0:
            return []
        anchors = [(n, as_tensor(payload.arrays[HEAD + n], p.device)) for n, p in model.named_parameters()]
        mu = self.config.mu

        def proximal(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            return 0.5 * mu * sum(((params[n] - g) ** 2).sum() for n, g in anchors)

        return [proximal]


@register
class FedProx(HeadServer):
    name = "fedprox"
    summary = "FedProx: FedAvg's head with a proximal term (mu/2)||w - w_global||^2"
    Config = FedProxConfig
    ClientClass = FedProxClient
