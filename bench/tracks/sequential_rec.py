"""Federated sequential recommendation: users are clients, the task is the next item.

The protocol (docs/recommendation.md), leak-free by construction:

* Each user's interactions in time order; the last is the test item, the one before it the
  validation item, the rest train (bench/data/movielens.py). A client holds only its user's
  training rows; its training negatives are the client's own business (drawn outside its
  *training* items, so the validation and test items can be negatives, as in deployment).
* Validation and test each have their own 99 negatives per user, drawn from the items the
  user never interacted with, from a generator of the run seed alone: every method ranks the
  same candidates.
* HR@10 and NDCG@10 on the 100 sampled candidates and by full ranking over every item the
  user has not interacted with before the target (the history is excluded). Ties count at
  their expected position under a uniformly random order, so a constant scorer gets chance.
* The validation history is the training sequence; the test history adds the validation item.

One stage, `training.rounds` rounds. Every evaluation scores validation (the rounds table's
`acc_seen` is validation HR@10, sampled) and, unless `eval.split` is val, test. The summary
gives test figures at the last round and at the round of best validation HR@10, labelled.

The methods rank through `Server.score(requests, kept)`: a request batch holds `clients`,
`users` and `history` (item ids, most recent last, left-padded with -1); the answer is a
score for every item per request. `kept` is each client's kept state (its own device's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from bench.api import ServerHandle, TaskInfo
from bench.config import ConfigError, ExperimentConfig
from bench.data import Dataset
from bench.metrics import stats_column
from bench.seeds import derive_seed
from bench.tracks.base import Stage, Track, register_track

K = 10
NEGATIVES = 99
CHUNK = 256  # requests per score call: a chunk's full score matrix is CHUNK x items floats
METRIC_NAMES = ("hr10", "ndcg10", "hr10_full", "ndcg10_full")


@dataclass
class RankingRecord:
    """Every evaluation: its round and, per split, the four metrics."""

    evaluations: list[dict[str, Any]] = field(default_factory=list)


def expected_hits(greater: np.ndarray, equal: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """HR@k and NDCG@k of targets with `greater` candidates scored above them and `equal`
    tied with them, at the expectation over a uniformly random order of the ties."""
    hr = np.zeros(len(greater))
    ndcg = np.zeros(len(greater))
    for i, (g, e) in enumerate(zip(greater.tolist(), equal.tolist())):
        pos = np.arange(g, g + e + 1)
        inside = pos[pos < k]
        hr[i] = len(inside) / (e + 1)
        ndcg[i] = float(np.sum(1.0 / np.log2(inside + 2))) / (e + 1)
    return hr, ndcg


def rank_metrics(scores: np.ndarray, target: np.ndarray, negatives: np.ndarray, history: list[np.ndarray]) -> dict[str, float]:
    """The four metrics of one split from each request's scores over every item."""
    rows = np.arange(len(target))
    t = scores[rows, target]
    neg = scores[rows[:, None], negatives]
    hr, ndcg = expected_hits((neg > t[:, None]).sum(1), (neg == t[:, None]).sum(1))
    full = scores.astype(np.float64, copy=True)
    for i, h in enumerate(history):
        full[i, h] = -np.inf
    full[rows, target] = t
    greater = (full > t[:, None]).sum(1)
    equal = (full == t[:, None]).sum(1) - 1
    hr_f, ndcg_f = expected_hits(greater, equal)
    return {"hr10": float(hr.mean()), "ndcg10": float(ndcg.mean()), "hr10_full": float(hr_f.mean()), "ndcg10_full": float(ndcg_f.mean())}


def sample_negatives(n_items: int, seen: list[np.ndarray], seed: int) -> np.ndarray:
    """NEGATIVES items per user, without replacement, none of them in the user's `seen`."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(seen), NEGATIVES), dtype=np.int64)
    for i, s in enumerate(seen):
        pool = np.setdiff1d(np.arange(n_items), s)
        if len(pool) < NEGATIVES:
            raise ConfigError(f"user {i} has interacted with all but {len(pool)} items: {NEGATIVES} negatives cannot be drawn")
        out[i] = rng.choice(pool, size=NEGATIVES, replace=False)
    return out


def padded(seqs: list[np.ndarray]) -> np.ndarray:
    """Sequences right-aligned in one matrix, left-padded with -1."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, len(out[i]) - len(s) :] = s
    return out


@register_track
class SequentialRec(Track):
    name = "sequential_rec"
    summary = "users as clients, next item by leave-one-out; HR@10 and NDCG@10, sampled (100) and full ranking"
    extra_tables = {
        "ranking": pa.schema(
            [
                ("method", pa.string()),
                ("round", pa.int64()),
                ("split", pa.string()),
                *[(m, pa.float64()) for m in METRIC_NAMES],
            ]
        )
    }
    summary_columns = (
        *[(m, pa.float64()) for m in METRIC_NAMES],  # test, at the last round
        *[(f"{m}_at_val", pa.float64()) for m in METRIC_NAMES],  # test, at the round of best validation HR@10
        ("val_round", pa.int64()),
        ("val_hr10", pa.float64()),  # validation HR@10 (sampled) at the last round
    )
    metric_labels = {
        "hr10": ("HR@10 (%)", True, 100, 1),
        "ndcg10": ("NDCG@10 (%)", True, 100, 1),
        "hr10_full": ("HR@10 full (%)", True, 100, 1),
        "ndcg10_full": ("NDCG@10 full (%)", True, 100, 1),
        "hr10_at_val": ("HR@10 at val. round (%)", True, 100, 1),
        "ndcg10_at_val": ("NDCG@10 at val. round (%)", True, 100, 1),
        "hr10_full_at_val": ("HR@10 full at val. round (%)", True, 100, 1),
        "ndcg10_full_at_val": ("NDCG@10 full at val. round (%)", True, 100, 1),
        "val_hr10": ("Val. HR@10 (%)", True, 100, 1),
    }
    headline = report_metrics = ("hr10", "ndcg10", "hr10_full", "ndcg10_full")
    tune_metric = "val_hr10"
    own_validation = True
    note = (
        "Test figures at the last round, leave-one-out: HR@10 and NDCG@10 among the target and 99 sampled negatives "
        "(fixed per run seed, the same for every method), and by full ranking over every item outside the user's history; "
        "ties at their expected rank. 'at val. round': at the round of best validation HR@10."
    )

    def __init__(self, cfg: ExperimentConfig, ds: Dataset, test_x: np.ndarray) -> None:
        super().__init__(cfg, ds, test_x)
        if ds.val_y is None:
            raise ConfigError(f"the {self.name} track needs a recommendation dataset (data.dataset: ml100k), not {ds.name}")
        n_users, n = len(ds.test_y), cfg.scenario.num_clients
        if n > n_users:
            raise ConfigError(
                f"scenario.num_clients is {n} but {ds.name} has {n_users} users (one client per user): set it to {n_users} or fewer"
            )
        self.users = (
            np.arange(n_users)
            if n == n_users
            else np.sort(np.random.default_rng(derive_seed(cfg.seed, "rec-users")).choice(n_users, n, replace=False))
        )
        rows_of = np.split(np.arange(len(ds.train_y)), np.flatnonzero(np.diff(ds.train_x[:, 0])) + 1)
        user_of_block = ds.train_x[[r[0] for r in rows_of], 0]
        block = dict(zip(user_of_block.tolist(), rows_of))
        self.client_rows = tuple(block[int(u)] for u in self.users)
        self.train_seq = [ds.train_y[r] for r in self.client_rows]
        self.val_target, self.test_target = ds.val_y[self.users], ds.test_y[self.users]
        seen = [np.concatenate([s, [v, t]]) for s, v, t in zip(self.train_seq, self.val_target, self.test_target)]
        self.negatives = {
            split: sample_negatives(ds.num_classes, seen, derive_seed(cfg.seed, "rec-negatives", split)) for split in ("val", "test")
        }
        self.splits = ("val",) if cfg.eval.split == "val" else ("val", "test")

    @property
    def num_stages(self) -> int:
        return 1

    def stage(self, t: int) -> Stage:
        items = tuple(range(self.ds.num_classes))
        return Stage(TaskInfo(t, items, items, {}), self.client_rows)

    def new_record(self) -> RankingRecord:
        return RankingRecord()

    def history(self, split: str) -> list[np.ndarray]:
        if split == "val":
            return self.train_seq
        return [np.append(s, v) for s, v in zip(self.train_seq, self.val_target)]

    def evaluate(self, server: ServerHandle, t: int, kept: dict[int, dict[str, np.ndarray]]) -> tuple[float, dict[str, dict[str, float]]]:
        out = {}
        for split in self.splits:
            hist = self.history(split)
            target = self.val_target if split == "val" else self.test_target
            scores = np.concatenate(
                [
                    np.asarray(
                        server.score(
                            {
                                "clients": np.arange(s, min(s + CHUNK, len(hist))),
                                "users": self.users[s : s + CHUNK],
                                "history": padded(hist[s : s + CHUNK]),
                            },
                            [kept.get(k) for k in range(s, min(s + CHUNK, len(hist)))],
                        ),
                        dtype=np.float64,
                    )
                    for s in range(0, len(hist), CHUNK)
                ]
            )
            out[split] = rank_metrics(scores, target, self.negatives[split], hist)
        return out["val"]["hr10"], out

    def observe(self, record: RankingRecord, t: int, r: int, headline: float, details: dict[str, dict[str, float]]) -> None:
        record.evaluations.append({"round": r, **details})

    def end_stage(self, record: RankingRecord, t: int, headline: float, details: Any) -> None:
        """Every evaluation is kept by `observe`."""

    def summarize(self, record: RankingRecord) -> dict[str, Any]:
        last = record.evaluations[-1]
        best = max(record.evaluations, key=lambda e: e["val"]["hr10"])  # the first of equals: the earliest round
        out: dict[str, Any] = {"val_round": best["round"], "val_hr10": last["val"]["hr10"]}
        for m in METRIC_NAMES:
            out[m] = last["test"][m] if "test" in last else None
            out[f"{m}_at_val"] = best["test"][m] if "test" in best else None
        return out

    def rows(self, record: RankingRecord) -> dict[str, list[dict[str, Any]]]:
        return {"ranking": [{"round": e["round"], "split": split, **e[split]} for e in record.evaluations for split in self.splits]}

    @classmethod
    def figures(cls, rounds: Any, extra: dict[str, Any], style: dict[str, dict]) -> dict[str, Any]:
        """Validation HR@10 over rounds per method (mean over seeds), and FedDMMR-style expert
        usage shares over rounds for the methods that report them."""
        import json

        import matplotlib.pyplot as plt

        out: dict[str, Any] = {}
        ranking = extra.get("ranking")
        if ranking is not None and not ranking.empty:
            val = ranking[ranking.split == "val"]
            fig, ax = plt.subplots(figsize=(5, 3.6))
            for m, sel in val.groupby("method"):
                curve = sel.groupby("round").hr10.mean()
                ax.plot(curve.index + 1, curve.values, label=m, **style.get(m, {}))
            ax.set(xlabel="round", ylabel="validation HR@10 (sampled)", title="HR@10 over rounds")
            ax.legend(fontsize="small")
            out["rec_hr10_rounds"] = fig
        usage_cols = sorted({k for s in rounds.stats.dropna() for k in json.loads(s) if k.startswith("usage_")})
        if usage_cols:
            methods = sorted(m for m, sel in rounds.groupby("method") if stats_column(sel, usage_cols[0]).notna().any())
            fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.4), squeeze=False)
            for ax, m in zip(axes[0], methods):
                sel = rounds[rounds.method == m]
                for col, ls in zip(usage_cols, ["-", "--", ":"]):
                    share = stats_column(sel, col).groupby(sel["round"]).mean()
                    ax.plot(share.index + 1, share.values, ls, color="0.2", label=col.removeprefix("usage_"))
                ax.set(xlabel="round", ylabel="mean router weight", title=f"{m}: expert usage")
                ax.legend(fontsize="small")
            out["rec_expert_usage"] = fig
        return out

    def describe(self) -> dict[str, Any]:
        return {"num_tasks": 1, "users": len(self.users), "users_dropped": self.ds.dropped}
