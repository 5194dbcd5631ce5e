"""FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the global model.

When the global model arrives, a client takes its lower layers as they are and mixes its
top `ala_layers` layers element by element: theta = local + (global - local) * W, with W in
[0, 1] learned on a seeded `sample_fraction` of its data (`ala_epochs` passes, SGD at
`ala_lr`, starting from the W it learned last time; all ones the first time). It then trains
theta as FedAvg does and sends it whole.

The received view (what a client holds right after taking the server's model) is the mix
with the W the client kept from its last round, before this round's W is learned: the server
cannot learn W without the client's data. That W is where the paper's ALA starts each round.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from baselines.pfl.common import PFLClient, PFLServer, State, Trained, personal_of, with_epochs
from baselines.pfl.model import PFLConfig
from bench.api import TrainContext, derive_seed, register
from bench.training import as_tensor, module_arrays, torch_generator, train_epochs

ALA = "ala."


class FedALAConfig(PFLConfig):
    ala_layers: int = Field(1, ge=1)  # top layers (weight and bias each) mixed element-wise; the rest taken from the server
    sample_fraction: float = Field(0.8, gt=0, le=1)
    ala_epochs: int = Field(1, ge=1)
    ala_lr: float = Field(1.0, gt=0)


class FedALAClient(PFLClient):
    config: FedALAConfig

    def top_keys(self) -> tuple[str, ...]:
        """The parameters of the top `ala_layers` layers (layers in state-dict order)."""
        layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in self.keys))
        top = set(layers[-self.config.ala_layers :])
        return tuple(k for k in self.keys if k.rsplit(".", 1)[0] in top)

    def received(self, glob: State, kept: State | None) -> State:
        if kept is None:
            return self.server_model(glob)
        own, top = personal_of(kept), self.top_keys()
        return {k: (own[k] + (glob[k] - own[k]) * kept[ALA + k]).astype(glob[k].dtype) if k in top else glob[k] for k in self.keys}

    def learn_weights(self, glob: State, kept: State, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """This round's W on a seeded share of the client's data, from last round's W."""
        dev, own, top = ctx.device, personal_of(kept), self.top_keys()
        model = self.model(self.received(glob, kept), dev)
        base = {k: as_tensor(own[k], dev) for k in top}
        gap = {k: as_tensor(glob[k], dev) - base[k] for k in top}
        W = {k: as_tensor(kept[ALA + k], dev).clone().requires_grad_() for k in top}
        rng = np.random.default_rng(derive_seed(ctx.seed, "ala-sample"))
        idx = torch.as_tensor(
            np.sort(rng.choice(len(y), max(1, int(self.config.sample_fraction * len(y))), replace=False)), device=x.device
        )
        fixed = {k: v.detach() for k, v in model.named_parameters() if k not in top}

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            params = {**fixed, **{k: base[k] + gap[k] * W[k] for k in top}}
            return F.cross_entropy(functional_call(model, params, (xb,)), yb)

        def clamp() -> None:
            with torch.no_grad():
                for w in W.values():
                    w.clamp_(0.0, 1.0)

        opt = torch.optim.SGD(W.values(), lr=self.config.ala_lr)
        ctx_w = with_epochs(ctx, self.config.ala_epochs)
        train_epochs(
            list(W.values()), x[idx], y[idx], ctx_w, loss, torch_generator(derive_seed(ctx.seed, "ala")), optimizer=opt, after_step=clamp
        )
        return {k: w.detach() for k, w in W.items()}

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        top = self.top_keys()
        if kept is None:
            start, W = self.server_model(glob), {k: np.ones_like(glob[k]) for k in top}
        else:
            learned = self.learn_weights(glob, kept, x, y, ctx)
            W = {k: w.cpu().numpy() for k, w in learned.items()}
            start = self.received(glob, {**kept, **{ALA + k: w for k, w in W.items()}})
        model = self.model(start, ctx.device)
        loss = self.fit(list(model.parameters()), model, x, y, ctx, "train")
        state = module_arrays(model)
        return Trained(state, state, loss, {ALA + k: w.astype(np.float32) for k, w in W.items()})


@register
class FedALA(PFLServer):
    name = "fedala"
    summary = "FedALA: each client mixes the global model's top layers into its own element-wise, with weights learned on its data"
    Config = FedALAConfig
    ClientClass = FedALAClient
