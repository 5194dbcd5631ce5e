"""PFedRec (Zhang et al., IJCAI 2023, "Dual Personalization on Federated Recommendation"):
the published federated anchor of the recommendation track.

Each user's model is an item embedding table and a score function (an MLP from an item's
embedding to the user's preference). The score function is personal: it stays on the
user's device (`ClientUpdate.kept`) and only its user trains it. The item embedding is
shared: each client fine-tunes the global table on its own interactions (binary
cross-entropy of its training items against sampled negatives) and sends back the rows it
touched; the server averages each row over the clients that sent it. A user is scored with
the global table and its own score function. Not sequential: the order of a user's items
does not enter. What is not the paper's: the user is scored with the global table, not its
own fine-tuned copy of it (a copy per user would be a full table per device in memory here);
a user never sampled has no score function yet and is scored with the initial one, counted in
`stats` as `scored_without_own_model` (users, at the latest evaluation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from baselines.rec.method import RecServer, banned_items, negatives_for, seeded_dropout
from bench.api import Client, ClientData, ClientUpdate, Message, MethodConfig, Server, TaskInfo, TrainContext, derive_seed, register
from bench.training import module_arrays, module_from_arrays, torch_generator, train_epochs

ITEMS, SCORE = "items.", "score."


class PFedRecConfig(MethodConfig):
    id_dim: int = Field(32, ge=4)  # the paper's latent size
    hidden: list[int] = [32, 16]  # the score function's hidden layers
    negatives: int = Field(4, ge=1)  # sampled negatives per training item


class ScoreFunction(nn.Module):
    def __init__(self, cfg: PFedRecConfig) -> None:
        super().__init__()
        dims = [cfg.id_dim, *cfg.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb).squeeze(-1)


def item_table(cfg: PFedRecConfig, n_items: int) -> nn.Embedding:
    emb = nn.Embedding(n_items + 1, cfg.id_dim, padding_idx=0)  # shifted ids, as the other rec methods
    nn.init.normal_(emb.weight, std=0.1)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


class PFedRecClient(Client):
    config: PFedRecConfig

    def local_train(self, payload: Message, data: ClientData, ctx: TrainContext) -> ClientUpdate:
        cfg, dev = self.config, ctx.device
        emb = module_from_arrays(lambda: item_table(cfg, self.env.num_classes), payload.arrays, ITEMS, dev)
        own = ctx.kept if ctx.kept is not None else {k: v for k, v in payload.arrays.items() if k.startswith(SCORE)}
        score = module_from_arrays(lambda: ScoreFunction(cfg), own, SCORE, dev)
        seq = np.asarray(data.y, dtype=np.int64)
        positives = torch.as_tensor(np.unique(seq) + 1, device=dev)
        banned = banned_items([seq], self.env.num_classes, dev)
        gen = torch_generator(derive_seed(ctx.seed, "negatives"))
        drawn: list[torch.Tensor] = []

        def loss_fn(pos: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            neg = negatives_for(banned.expand(len(pos), -1), cfg.negatives, gen)
            drawn.append(neg)
            ids = torch.cat([pos, neg.reshape(-1)])
            labels = torch.cat([torch.ones(len(pos), device=dev), torch.zeros(neg.numel(), device=dev)])
            return F.binary_cross_entropy_with_logits(score(emb(ids)), labels)

        with seeded_dropout(derive_seed(ctx.seed, "dropout"), dev):
            loss = train_epochs([*emb.parameters(), *score.parameters()], positives, positives, ctx, loss_fn, torch_generator(ctx.seed))
        rows = torch.unique(torch.cat([positives, *[d.reshape(-1) for d in drawn]]))
        arrays = {"item_rows": rows.cpu().numpy(), "item_emb_rows": emb.weight.detach()[rows].cpu().numpy()}
        return ClientUpdate(arrays=arrays, num_samples=len(seq), loss=loss, kept=module_arrays(score, SCORE))


@register
class PFedRec(Server):
    name = "pfedrec"
    summary = "PFedRec (IJCAI 2023): a personal score function kept on each device, the item embedding federated row by row"
    Config = PFedRecConfig
    ClientClass = PFedRecClient
    input = "interactions"
    tracks = ("sequential_rec",)
    config: PFedRecConfig

    def setup(self) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.env.run_seed, "rec-model"))
            self.items = item_table(self.config, self.env.num_classes)
            self.initial = ScoreFunction(self.config)
        self._payload: Message | None = None
        self._own: dict[int, bool] = {}  # client -> scored with its own score function at the latest evaluation

    def begin_task(self, task: TaskInfo) -> None:
        self._payload = None

    def payload_for(self, client_id: int) -> Message:
        if self._payload is None:  # the initial score function serves a client's first round (unchanged: sent once)
            self._payload = Message({**module_arrays(self.items, ITEMS), **module_arrays(self.initial, SCORE)})
        return self._payload

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        table = self.items.weight.detach().numpy()
        self.items.weight.data = torch.from_numpy(RecServer.averaged_rows(table, updates))
        self._payload = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError("pfedrec ranks items (Server.score); it does not classify")

    def score(self, requests: dict[str, np.ndarray], kept: list[dict[str, np.ndarray] | None]) -> np.ndarray:
        with torch.no_grad():
            emb = self.items.weight[1:]
            out = []
            for client, own in zip(requests["clients"].tolist(), kept):
                self._own[client] = own is not None
                f = self.initial if own is None else module_from_arrays(lambda: ScoreFunction(self.config), own, SCORE)
                out.append(f(emb).numpy())
        return np.stack(out)

    def stats(self) -> dict[str, float]:
        without = sum(not v for v in self._own.values())
        return {"scored_without_own_model": float(without)} if without else {}
