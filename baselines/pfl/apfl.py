"""APFL (Deng et al., 2020): adaptive personalised federated learning.

Each client trains FedAvg's global model w and its own model v; it predicts with the mix
alpha x v + (1 - alpha) x w, and v and alpha are trained on the mix's loss (w held fixed
inside the mix), alpha kept in [0, 1]. The client keeps v and alpha; taking a new global
model changes its mix (the received view).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from baselines.pfl.common import PFLClient, PFLServer, State, Trained
from baselines.pfl.model import PFLConfig
from bench.api import TrainContext, derive_seed, register
from bench.training import module_arrays, torch_generator, train_epochs

OWN = "v."


class APFLConfig(PFLConfig):
    alpha: float = Field(0.5, ge=0, le=1)  # the mix's starting weight of the client's own model


def mix(alpha: float, own: State, glob: State, keys: tuple[str, ...]) -> State:
    return {k: (alpha * own[k] + (1 - alpha) * glob[k]).astype(glob[k].dtype) for k in keys}


class APFLClient(PFLClient):
    config: APFLConfig

    def own(self, glob: State, kept: State | None) -> tuple[State, float]:
        if kept is None:
            return self.server_model(glob), self.config.alpha
        return {k: kept[OWN + k] for k in self.keys}, float(kept["alpha"][0])

    def received(self, glob: State, kept: State | None) -> State:
        own, alpha = self.own(glob, kept)
        return mix(alpha, own, glob, self.keys)

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        own, alpha0 = self.own(glob, kept)
        w, v = self.model(self.server_model(glob), ctx.device), self.model(own, ctx.device)
        alpha = torch.tensor(alpha0, device=ctx.device, requires_grad=True)
        wp, vp = dict(w.named_parameters()), dict(v.named_parameters())

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            mixed = {n: alpha * vp[n] + (1 - alpha) * wp[n].detach() for n in vp}
            return F.cross_entropy(w(xb), yb) + F.cross_entropy(functional_call(v, mixed, (xb,)), yb)

        def clamp() -> None:
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)

        params = [*w.parameters(), *v.parameters(), alpha]
        total = train_epochs(params, x, y, ctx, loss, torch_generator(derive_seed(ctx.seed, "apfl")), after_step=clamp)
        a = float(alpha.detach())
        glob_new, own_new = module_arrays(w), module_arrays(v)
        extra = {**{OWN + k: v_ for k, v_ in own_new.items()}, "alpha": np.array([a], dtype=np.float32)}
        return Trained(glob_new, mix(a, own_new, glob_new, self.keys), total, extra)


@register
class APFL(PFLServer):
    name = "apfl"
    summary = "APFL: a global model and a kept own model, predicting with their mix alpha*v + (1-alpha)*w, alpha learned"
    Config = APFLConfig
    ClientClass = APFLClient
