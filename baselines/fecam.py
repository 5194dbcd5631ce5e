"""Federated FeCAM (Goswami et al., NeurIPS 2023): class means and shrunk, normalised
class covariances of frozen features; Mahalanobis nearest-class classification.

Clients send per class the count, sum and sum of outer products of their (optionally
Tukey-transformed) features; the server sums them, which gives exactly the centralised
means and covariances. Covariance shrinkage and normalisation follow FeCAM's code:
C + gamma1 * mean(diag) * I + gamma2 * mean(off-diag) * (1 - I), then correlation-style
normalisation by the diagonal. Cost: a D x D float64 matrix per class a client holds, per task.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from baselines.statistics import StatisticsServer, statistics_report
from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, TrainContext, register


class FeCAMConfig(MethodConfig):
    tukey_beta: float | None = Field(0.5, gt=0)  # power transform sign(x)|x|^beta; null: off
    shrink_diag: float = Field(1.0, ge=0)  # gamma1
    shrink_offdiag: float = Field(1.0, ge=0)  # gamma2
    normalize_cov: bool = True


def transform(x: np.ndarray, beta: float | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x if beta is None else np.sign(x) * np.abs(x) ** beta


def class_gaussian(n: float, total: np.ndarray, outer: np.ndarray, cfg: FeCAMConfig) -> tuple[np.ndarray, np.ndarray]:
    """(mean, shrunk precision) of one class from its count, sum and sum of outer products."""
    mu = total / n
    return mu, shrunk_precision((outer - n * np.outer(mu, mu)) / (n - 1), cfg)


def distances(q: np.ndarray, means: list[np.ndarray], precisions: list[np.ndarray]) -> np.ndarray:
    """(n, k) squared Mahalanobis distances of the (transformed) rows of q to k classes."""
    dist = np.empty((len(q), len(means)))
    for i, (mu, prec) in enumerate(zip(means, precisions)):
        diff = q - mu
        dist[:, i] = ((diff @ prec) * diff).sum(1)
    return dist


def shrunk_precision(cov: np.ndarray, cfg: FeCAMConfig) -> np.ndarray:
    d = len(cov)
    off = ~np.eye(d, dtype=bool)
    cov = cov + cfg.shrink_diag * np.diag(cov).mean() * np.eye(d) + cfg.shrink_offdiag * cov[off].mean() * off
    if cfg.normalize_cov:
        sd = np.sqrt(np.diag(cov))
        cov = cov / np.outer(sd, sd)
    return np.linalg.inv(cov)


class FeCAMClient(Client):
    config: FeCAMConfig

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        x, y = transform(data.x, self.config.tukey_beta), np.asarray(data.y)
        k, d = self.env.num_classes, x.shape[1]
        classes = np.unique(y)
        counts, sums, outer = np.zeros(k), np.zeros((k, d)), np.zeros((k, d, d))
        for c in classes:
            xc = x[y == c]
            counts[c], sums[c], outer[c] = len(xc), xc.sum(0), xc.T @ xc
        # only the classes this client holds travel (the server adds them into place)
        arrays = {"classes": classes, "count": counts[classes], "sum": sums[classes], "outer": outer[classes]}
        return statistics_report(arrays, data)


@register
class FeCAM(StatisticsServer):
    name = "fecam"
    summary = "FeCAM: class means + shrunk class covariances from summed client statistics, Mahalanobis NCM"
    Config = FeCAMConfig
    ClientClass = FeCAMClient
    config: FeCAMConfig

    def setup(self) -> None:
        super().setup()
        self.means: dict[int, np.ndarray] = {}
        self.precisions: dict[int, np.ndarray] = {}

    def current(self) -> dict[str, np.ndarray]:
        """Per-class statistics scattered to full (num_classes, ...) arrays, then summed."""
        out = {k: v.copy() for k, v in self.totals.items()}
        for arrays in self.reports.values():
            for key in ("count", "sum", "outer"):
                full = out.setdefault(key, np.zeros((self.env.num_classes, *arrays[key].shape[1:])))
                np.add.at(full, arrays["classes"], arrays[key])
        return out

    def refit(self, stats: dict[str, np.ndarray]) -> None:
        changed = set().union(*(a["classes"].tolist() for a in self.reports.values()))
        for c in sorted(changed):
            if stats["count"][c] < 2:
                continue
            self.means[int(c)], self.precisions[int(c)] = class_gaussian(stats["count"][c], stats["sum"][c], stats["outer"][c], self.config)

    def predict(self, x: np.ndarray) -> np.ndarray:
        q = transform(x, self.config.tukey_beta)
        have = [c for c in self.seen.tolist() if c in self.means]
        dist = distances(q, [self.means[c] for c in have], [self.precisions[c] for c in have])
        return np.asarray(have)[np.argmin(dist, axis=1)]
