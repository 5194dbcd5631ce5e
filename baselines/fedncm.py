"""FedNCM: nearest-class-mean on frozen features, class sums and counts aggregated on the
server. It cannot forget (old means never change), so it shows what the frozen backbone
alone gives: the honest reference for every method trained on top of it."""

from __future__ import annotations

import numpy as np

from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, Server, TaskInfo, TrainContext, register


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
        return ClientUpdate(arrays={"sums": sums, "counts": counts}, num_samples=len(data.y), loss=0.0)


@register
class FedNCM(Server):
    name = "fedncm"
    summary = "FedNCM: nearest-class-mean on frozen features; class means aggregated from client sums/counts"
    Config = FedNCMConfig
    ClientClass = FedNCMClient
    config: FedNCMConfig

    def setup(self) -> None:
        self.means = np.zeros((self.env.num_classes, self.env.feature_dim))
        self.seen = np.zeros(0, dtype=np.int64)
        self.current: tuple[int, ...] = ()

    def begin_task(self, task: TaskInfo) -> None:
        self.seen = np.asarray(task.seen_classes, dtype=np.int64)
        self.current = task.classes

    def payload_for(self, client_id: int) -> Message:
        return Message()  # nothing to download: the client only reports statistics

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        sums = sum(u.arrays["sums"] for u in updates)
        counts = sum(u.arrays["counts"] for u in updates)
        have = counts > 0  # every round recomputes the same task statistics: idempotent
        self.means[have] = sums[have] / counts[have, None]

    def predict(self, x: np.ndarray) -> np.ndarray:
        q = _prep(x, self.config.normalize)
        m = self.means[self.seen]
        d = (q**2).sum(1, keepdims=True) - 2 * q @ m.T + (m**2).sum(1)
        return self.seen[np.argmin(d, axis=1)]
