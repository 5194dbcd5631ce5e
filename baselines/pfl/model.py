"""The personalised track's models: a shared base and a head, as FedPer, FedRep and PFLlib split them.

* `mlp`: a hidden layer on frozen backbone features (base) and a linear classifier (head);
* `cnn`: PFLlib's FedAvgCNN on raw 32x32 images (two 5x5 convolutions with max-pooling and a
  512-unit layer as the base, a linear classifier as the head), trained end to end.

A model's state travels as numpy arrays named by its state dict ("base.*", "head.*").
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from bench.api import MethodConfig, MethodEnv, derive_seed
from bench.training import as_tensor, load_module_arrays, module_arrays

BASE, HEAD = "base.", "head."


class PFLConfig(MethodConfig):
    model: Literal["mlp", "cnn"] = "mlp"
    hidden: int = Field(512, ge=1)  # width of the base's output (the MLP's hidden layer, the CNN's last layer)


class SplitNet(nn.Module):
    def __init__(self, base: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.base, self.head = base, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


def _layers(cfg: PFLConfig, env: MethodEnv) -> SplitNet:
    if cfg.model == "mlp":
        return SplitNet(nn.Sequential(nn.Linear(env.feature_dim, cfg.hidden), nn.ReLU()), nn.Linear(cfg.hidden, env.num_classes))
    side = ((env.image_size - 4) // 2 - 4) // 2  # two 5x5 valid convolutions, each followed by 2x2 pooling
    base = nn.Sequential(
        nn.Conv2d(3, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, cfg.hidden),
        nn.ReLU(),
    )
    return SplitNet(base, nn.Linear(cfg.hidden, env.num_classes))


def state_keys(cfg: PFLConfig, env: MethodEnv) -> tuple[str, ...]:
    with torch.device("meta"):
        return tuple(_layers(cfg, env).state_dict())


def initial_state(cfg: PFLConfig, env: MethodEnv) -> dict[str, np.ndarray]:
    """The model every client and the server start from, seeded by the run seed."""
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(env.run_seed, "pfl-model"))
        return module_arrays(_layers(cfg, env))


def net(cfg: PFLConfig, env: MethodEnv, state: dict[str, np.ndarray], device: str | torch.device = "cpu") -> SplitNet:
    """A model holding (copies of) `state`, on `device`."""
    with torch.device("meta"):
        model = _layers(cfg, env)
    load_module_arrays(model, state, assign=True)
    return model.to(device)


def as_inputs(x: np.ndarray | torch.Tensor, env: MethodEnv, device: str | torch.device) -> torch.Tensor:
    """Features as float32; images (uint8 N x H x W x 3) as normalised float32 N x 3 x H x W."""
    t = as_tensor(x, device)
    if t.dtype != torch.uint8:
        return t.float()
    mean = torch.tensor(env.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(env.image_std, device=device).view(1, 3, 1, 1)
    return (t.permute(0, 3, 1, 2).float().div(255) - mean) / std


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    model.eval()
    out = [model(x[a : a + chunk]) for a in range(0, len(x), chunk)]
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, 0), dtype=np.float32)
