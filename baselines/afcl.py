"""AFCL (analytic federated continual learning, arXiv 2505.12245): a closed-form ridge
classifier on frozen features, federated exactly.

Each client sends, once per task, the Gram matrix Phi^T Phi of its features and the
cross product Phi^T Y with one-hot labels (Phi: the features, optionally after a fixed,
seeded random ReLU expansion as in RanPAC). The server sums them over clients and tasks
and solves (G + lambda I) W = C, which is exactly centralised joint ridge regression on all
data seen so far, whatever the partition, alpha or task order. The cost is the Gram
matrix: width^2 float64 values per client per task (2 MB at 512, 134 MB at 4096).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from baselines.statistics import StatisticsServer, statistics_report
from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, MethodEnv, TrainContext, derive_seed, register


class AFCLConfig(MethodConfig):
    ridge: float = Field(1.0, gt=0)  # lambda
    expansion: int = Field(0, ge=0)  # width of the random ReLU expansion; 0 = raw features


def expand(x: np.ndarray, cfg: AFCLConfig, env: MethodEnv) -> np.ndarray:
    """Raw features (float64), or ReLU(x W) with W drawn from the run seed (same everywhere)."""
    x = np.asarray(x, dtype=np.float64)
    if cfg.expansion == 0:
        return x
    rng = np.random.default_rng(derive_seed(env.run_seed, "afcl", "expansion"))
    w = rng.standard_normal((env.feature_dim, cfg.expansion)) / np.sqrt(env.feature_dim)
    return np.maximum(x @ w, 0.0)


class AFCLClient(Client):
    config: AFCLConfig

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        phi = expand(data.x, self.config, self.env)
        onehot = np.zeros((len(data.y), self.env.num_classes))
        onehot[np.arange(len(data.y)), np.asarray(data.y)] = 1.0
        arrays = {"gram": phi.T @ phi, "cross": phi.T @ onehot}
        return statistics_report(arrays, data)


@register
class AFCL(StatisticsServer):
    name = "afcl"
    summary = "AFCL: analytic ridge classifier from summed client Gram matrices; equals centralised ridge exactly"
    Config = AFCLConfig
    ClientClass = AFCLClient
    config: AFCLConfig

    def setup(self) -> None:
        super().setup()
        self.weights: np.ndarray | None = None

    def refit(self, stats: dict[str, np.ndarray]) -> None:
        g = stats["gram"]
        self.weights = np.linalg.solve(g + self.config.ridge * np.eye(len(g)), stats["cross"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        scores = expand(x, self.config, self.env) @ self.weights[:, self.seen]
        return self.seen[np.argmax(scores, axis=1)]
