"""The recommendation track's references: not federated methods, the rows that frame them.

* `sasrec`: centralised SASRec, the bound. Each client uploads its training sequence the
  first time it is sampled (the bytes columns count that upload); every round the server
  trains the same model as FedAvg over SASRec on all sequences it holds.
* `popularity`: the sanity floor. Each client uploads its items' counts once; every user
  gets the items ranked by how many training interactions they have.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from pydantic import Field

from baselines.rec.method import RecConfig, RecServer, WindowScorer, banned_items, seeded_dropout, windows
from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, Server, TaskInfo, TrainContext, derive_seed, register
from bench.training import torch_generator, train_epochs

SENT = {"sent": np.ones(1, np.int8)}  # what a reference's client keeps: that it has uploaded


class UploadClient(Client):
    """Sends its training sequence once, then nothing."""

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        if ctx.kept is not None:
            return ClientUpdate(num_samples=0, loss=float("nan"), kept=ctx.kept)
        seq = np.asarray(data.y, dtype=np.int64)
        return ClientUpdate(arrays={"seq": seq}, meta={"client": ctx.client_id}, num_samples=len(seq), loss=float("nan"), kept=SENT)


class CentralConfig(RecConfig):
    epochs: int = Field(1, ge=1)  # passes over every sequence held, each round
    batch_size: int = Field(128, ge=1)  # windows per step


@register
class CentralSASRec(RecServer):
    name = "sasrec"
    summary = "SASRec trained centrally on every uploaded sequence (reference bound, not federated)"
    Config = CentralConfig
    ClientClass = UploadClient
    config: CentralConfig

    def setup(self) -> None:
        super().setup()
        self.sequences: dict[int, np.ndarray] = {}

    def payload_for(self, client_id: int) -> Message:
        return Message()

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        for u in updates:
            if "seq" in u.arrays:
                self.sequences[u.meta["client"]] = u.arrays["seq"]
        if not self.sequences:
            return
        cfg = self.config
        seqs = [self.sequences[k] for k in sorted(self.sequences)]
        wins = [windows(s, cfg.max_seq_len) for s in seqs]
        win = torch.as_tensor(np.concatenate(wins))
        users = torch.as_tensor(np.repeat(np.arange(len(wins)), [len(w) for w in wins]))
        seed = derive_seed(self.env.run_seed, "central", self.rounds)
        scorer = WindowScorer(self.model, cfg, banned_items(seqs, self.env.num_classes, "cpu"), None, None, seed)
        settings = replace(self.env.train, local_epochs=cfg.epochs, batch_size=cfg.batch_size)
        with seeded_dropout(derive_seed(seed, "dropout"), "cpu"):
            self.model.train()
            train_epochs(
                self.model.parameters(),
                win,
                users,
                TrainContext(self.env.run_seed, 0, self.rounds, 0, settings),
                scorer.loss,
                torch_generator(seed),
            )
        self.rounds += 1


class PopularityClient(Client):
    """Sends its training items' counts once, then nothing."""

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        if ctx.kept is not None:
            return ClientUpdate(num_samples=0, loss=float("nan"), kept=ctx.kept)
        items, counts = np.unique(np.asarray(data.y, dtype=np.int64), return_counts=True)
        return ClientUpdate(arrays={"items": items, "counts": counts}, num_samples=len(data.y), loss=float("nan"), kept=SENT)


@register
class Popularity(Server):
    name = "popularity"
    summary = "Item popularity: every user gets the items with most training interactions first (sanity floor)"
    Config = MethodConfig
    ClientClass = PopularityClient
    input = "interactions"
    tracks = ("sequential_rec",)

    def setup(self) -> None:
        self.counts = np.zeros(self.env.num_classes, np.float64)

    def begin_task(self, task: TaskInfo) -> None:
        pass

    def rounds_for_task(self, configured: int, full_participation: bool) -> int:
        """Exact after one round when every client takes part."""
        return 1 if full_participation else configured

    def payload_for(self, client_id: int) -> Message:
        return Message()

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        for u in updates:
            if "items" in u.arrays:
                np.add.at(self.counts, u.arrays["items"], u.arrays["counts"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError("popularity ranks items (Server.score); it does not classify")

    def score(self, requests: dict[str, np.ndarray], kept: list[Any]) -> np.ndarray:
        return np.broadcast_to(self.counts.astype(np.float32), (len(requests["history"]), len(self.counts))).copy()
