"""FedProto (Tan et al., AAAI 2022): clients share class prototypes, never model parameters.

Each client trains its own model with cross-entropy plus `lam` x the mean squared difference
of its base features to the global prototype of their class (classes some client holds); it sends
the per-class sums and counts of its features, and the server returns their exact means.
A client predicts with its own classifier (the paper's alternative, the nearest global
prototype, is not built).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from baselines.pfl.common import ExtraLoss, PFLClient, PFLServer, State, Trained, personal_of
from baselines.pfl.model import PFLConfig, SplitNet, initial_state
from baselines.pfl.prototypes import global_prototypes, prototype_distance, prototype_sums
from bench.api import ClientUpdate, Message, TrainContext, register


class FedProtoConfig(PFLConfig):
    lam: float = Field(1.0, ge=0)


class FedProtoClient(PFLClient):
    config: FedProtoConfig

    def received(self, glob: State, kept: State | None) -> State:
        return initial_state(self.config, self.env) if kept is None else personal_of(kept)

    def extra_loss(self, glob: State, model: SplitNet, device: str) -> ExtraLoss | None:
        if "proto" not in glob or self.config.lam == 0:
            return None
        held = torch.as_tensor(glob["proto_count"] > 0, device=device)
        lam = self.config.lam
        return lambda x, y, logits: lam * (prototype_distance(model.base(x), y, glob) * held[y]).mean()

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        tr = super().train_round(glob, kept, x, y, ctx)
        return Trained(prototype_sums(self.model(tr.personal, ctx.device), x, y, self.env.num_classes), tr.personal, tr.loss)


@register
class FedProto(PFLServer):
    name = "fedproto"
    summary = "FedProto: each client keeps its model; only class prototypes (feature means) are shared and pulled toward"
    Config = FedProtoConfig
    ClientClass = FedProtoClient

    def setup(self) -> None:
        super().setup()
        self.proto: State = {}

    def payload_for(self, client_id: int) -> Message:
        return Message(self.proto)

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        proto, counts = global_prototypes(updates)
        self.proto = {"proto": proto, "proto_count": counts.astype(np.float32)}
        self.round += 1
