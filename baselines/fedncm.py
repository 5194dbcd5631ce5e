"""FedNCM: nearest-class-mean on frozen features, class sums and counts aggregated on the
server. It cannot forget (old means never change), so it shows what the frozen backbone
alone gives: the honest reference for every method trained on top of it.

It federates through sufficient statistics like AFCL and FeCAM (baselines.statistics): each
client's latest sums of a task count once, so partial participation over several rounds
still gives the means of every client that took part, and full participation needs one round.
"""

from __future__ import annotations

import numpy as np

from baselines.statistics import StatisticsServer, statistics_report
from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, TrainContext, register


class FedNCMConfig(MethodConfig):
    normalize: bool = True  # L2-normalise features before averaging and matching (cosine NCM)


def _prep(x: np.ndarray, normalize: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if normalize else x


class FedNCMClient(Client):
    config: FedNCMConfig

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        x = _prep(data.x, self.config.normalize)
        sums = np.zeros((self.env.num_classes, x.shape[1]))
        np.add.at(sums, data.y, x)
        counts = np.bincount(data.y, minlength=self.env.num_classes).astype(np.float64)
        arrays = {"sums": sums, "counts": counts}
        return statistics_report(arrays, data)


@register
class FedNCM(StatisticsServer):
    name = "fedncm"
    summary = "FedNCM: nearest-class-mean on frozen features; class means aggregated from client sums/counts"
    Config = FedNCMConfig
    ClientClass = FedNCMClient
    config: FedNCMConfig

    def setup(self) -> None:
        super().setup()
        self.means = np.zeros((self.env.num_classes, self.env.feature_dim))

    def refit(self, stats: dict[str, np.ndarray]) -> None:
        have = stats["counts"] > 0
        self.means[have] = stats["sums"][have] / stats["counts"][have, None]

    def predict(self, x: np.ndarray) -> np.ndarray:
        q = _prep(x, self.config.normalize)
        m = self.means[self.seen]
        d = (q**2).sum(1, keepdims=True) - 2 * q @ m.T + (m**2).sum(1)
        return self.seen[np.argmin(d, axis=1)]
