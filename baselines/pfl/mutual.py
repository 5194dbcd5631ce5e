"""Two models per client that teach each other: federated mutual learning (FML) and the
research notes' Deputy-Enhanced Transfer (DET), with the Conjoint Prototype-Aligned loss (CPA).

Each client keeps its personal model P on its device; a second, shared model (FML's "meme",
DET's deputy D) is what it receives from the server and sends back. P is never overwritten
by the server's model, so the personal model it predicts with is untouched when that model
arrives (its "received" view is P itself).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from baselines.pfl.common import PFLClient, PFLServer, State, Trained, with_epochs
from baselines.pfl.model import PFLConfig, SplitNet
from baselines.pfl.prototypes import global_prototypes, prototype_distance, prototype_sums
from bench.api import ClientUpdate, TrainContext, derive_seed, register
from bench.training import as_tensor, distillation, module_arrays, torch_generator, train_epochs

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y, logits P, logits D)


class PairClient(PFLClient):
    """P (personal, kept) and a shared model trained side by side, one minibatch order."""

    second_model = True

    def keeps(self, key: str) -> bool:
        return True

    def fit_pair(self, p: SplitNet, d: SplitNet, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext, tag: str, loss: PairLoss) -> float:
        params = [*p.parameters(), *d.parameters()]
        return train_epochs(params, x, y, ctx, lambda xb, yb: loss(xb, yb, p(xb), d(xb)), torch_generator(derive_seed(ctx.seed, tag)))


class FMLConfig(PFLConfig):
    alpha: float = Field(0.5, ge=0, le=1)  # the meme's weight of cross-entropy (the rest: KL toward the local model)
    beta: float = Field(0.5, ge=0, le=1)  # the local model's weight of cross-entropy (the rest: KL toward the meme)
    temperature: float = Field(1.0, gt=0)


class FMLClient(PairClient):
    config: FMLConfig

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        c = self.config
        p, meme = self.model(self.received(glob, kept), ctx.device), self.model(self.arriving(glob, kept), ctx.device)

        def loss(xb: torch.Tensor, yb: torch.Tensor, lp: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
            local = c.beta * F.cross_entropy(lp, yb) + (1 - c.beta) * distillation(lp, lm.detach(), c.temperature)
            shared = c.alpha * F.cross_entropy(lm, yb) + (1 - c.alpha) * distillation(lm, lp.detach(), c.temperature)
            return local + shared

        total = self.fit_pair(p, meme, x, y, ctx, "mutual", loss)
        return Trained(module_arrays(meme), module_arrays(p), total)


@register
class FML(PFLServer):
    name = "fml"
    summary = "Federated mutual learning: a kept local model and a shared meme model teach each other by KL"
    Config = FMLConfig
    ClientClass = FMLClient


class DETConfig(PFLConfig):
    l1: float = Field(0.7, gt=0, lt=1)  # below l1 x val(P) the deputy recovers (learns from P)
    l2: float = Field(0.9, gt=0, lt=1)  # between l1 and l2 x val(P) the two exchange; above, the deputy sublimates
    temperature: float = Field(1.0, gt=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)  # the client's own slice of its training data that the phase is decided on

    @model_validator(mode="after")
    def _ordered(self) -> DETConfig:
        if not self.l1 < self.l2:
            raise ValueError(f"DET needs 0 < l1 < l2 < 1 (got l1={self.l1}, l2={self.l2})")
        return self


PHASES = ("recover", "exchange", "sublimate")


class DETClient(PairClient):
    """Every epoch the phase is chosen by the deputy's validation accuracy against P's:
    Recover (D learns from P by KL; P trains alone), Exchange (mutual learning), Sublimate
    (D trains alone and teaches P)."""

    config: DETConfig

    def supervised(self, glob: State, model: SplitNet, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The supervised term of both models (CPA replaces it)."""
        return F.cross_entropy(logits, y)

    def own_split(self, n: int, ctx: TrainContext) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, validation rows) of the client's data, the same every round."""
        rng = np.random.default_rng(derive_seed(ctx.run_seed, "det-val", ctx.client_id))
        val = rng.choice(n, size=max(1, int(round(self.config.val_fraction * n))), replace=False) if n >= 2 else np.zeros(0, int)
        return np.setdiff1d(np.arange(n), val), np.sort(val)

    def phase(self, p: SplitNet, d: SplitNet, x: torch.Tensor, y: torch.Tensor) -> int:
        if len(y) == 0:
            return 1
        with torch.no_grad():
            acc_p, acc_d = ((m(x).argmax(1) == y).float().mean().item() for m in (p, d))
        return 0 if acc_d < self.config.l1 * acc_p else 1 if acc_d < self.config.l2 * acc_p else 2

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        c = self.config
        p, d = self.model(self.received(glob, kept), ctx.device), self.model(self.arriving(glob, kept), ctx.device)
        tr, va = (torch.as_tensor(i, device=x.device) for i in self.own_split(len(y), ctx))
        counts, losses = [0, 0, 0], []

        for epoch in range(ctx.train.local_epochs):
            ph = self.phase(p, d, x[va], y[va])
            counts[ph] += 1

            def loss(xb: torch.Tensor, yb: torch.Tensor, lp: torch.Tensor, ld: torch.Tensor, ph: int = ph) -> torch.Tensor:
                sp, sd = self.supervised(glob, p, xb, yb, lp), self.supervised(glob, d, xb, yb, ld)
                kl_d = distillation(ld, lp.detach(), c.temperature) if ph < 2 else 0.0  # D learns from P
                kl_p = distillation(lp, ld.detach(), c.temperature) if ph > 0 else 0.0  # P learns from D
                return sp + sd + kl_d + kl_p

            losses.append(self.fit_pair(p, d, x[tr], y[tr], with_epochs(ctx, 1), f"epoch{epoch}", loss))
        return Trained(module_arrays(d), module_arrays(p), float(np.mean(losses)), meta={"phases": counts})


class DETServer(PFLServer):
    def setup(self) -> None:
        super().setup()
        self.phase_counts = np.zeros(3, dtype=np.int64)

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        self.phase_counts = np.sum([u.meta.get("phases", [0, 0, 0]) for u in updates], axis=0)
        super().aggregate(updates)

    def stats(self) -> dict[str, float]:
        """The share of the round's client epochs in each phase."""
        total = max(1, int(self.phase_counts.sum()))
        return {f"det_{name}": float(n) / total for name, n in zip(PHASES, self.phase_counts)}


@register
class DET(DETServer):
    name = "det"
    summary = "DET: a kept personal model and a deputy that takes the server's model; recover, exchange, sublimate by validation"
    Config = DETConfig
    ClientClass = DETClient


class CPAConfig(DETConfig):
    lam: float = Field(0.1, ge=0)  # weight of the prototype alignment


class CPAClient(DETClient):
    """DET whose supervised term is the CPA loss: cross-entropy plus, per sample, the mean squared
    difference of its base features to its class's global prototype, weighted by the class's
    global rarity; the deputy's class prototypes (sums and counts) go up with it."""

    config: CPAConfig

    def supervised(self, glob: State, model: SplitNet, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, y)
        if "proto" not in glob or self.config.lam == 0:
            return ce
        weight = as_tensor(glob["proto_weight"], x.device)
        return ce + self.config.lam * (weight[y] * prototype_distance(model.base(x), y, glob)).mean()

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        tr = super().train_round(glob, kept, x, y, ctx)
        tr.upload.update(prototype_sums(self.model(self.server_model(tr.upload), ctx.device), x, y, self.env.num_classes))
        return tr


@register
class CPA(DETServer):
    name = "cpa"
    summary = "DET with the CPA loss: class features pulled to global prototypes, weighted by global class rarity"
    Config = CPAConfig
    ClientClass = CPAClient

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        """The model by the run's rule; the prototypes as exact sums over the round's clients."""
        super().aggregate(updates)
        self.proto, counts = global_prototypes(updates)
        held = counts > 0
        rarity = np.where(held, counts[held].mean() / np.maximum(counts, 1), 0)
        self.proto_weight = (rarity / rarity[held].mean()).astype(np.float32)

    def setup(self) -> None:
        super().setup()
        self.proto: np.ndarray | None = None
        self.proto_weight: np.ndarray | None = None

    def extra_payload(self) -> State:
        if self.proto is None or self.proto_weight is None:
            return {}
        return {"proto": self.proto, "proto_weight": self.proto_weight}
