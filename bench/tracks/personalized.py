"""Personalised federated learning: every client has its own data, its own model and its own metrics.

The scenario (docs/personalized.md):

* The training set, made long-tailed first when `scenario.imbalance` > 1 (class c keeps
  n_max * imbalance^(-c/(C-1)) samples, a seeded choice), is split over the clients by
  `scenario.partition` (Dirichlet alpha, shards, ...).
* Each client's test data follows its own label distribution: the test samples of class c
  are dealt to the clients in proportion to their training samples of c (largest
  remainder, in a seeded order), so no test sample is shared and none was trained on.
* Each client holds out a seeded `scenario.client_val_fraction` of its training samples:
  its validation data, on which the round chosen for the labelled figures is picked.
* `scenario.new_clients` clients (a seeded choice) take no part in training; at the last
  round each trains once from the server's model (local fine-tuning) and is evaluated.

One stage, `training.rounds` rounds. Methods answer `Server.score(requests, kept)` where a
request holds `clients` (one client id), `x` (that client's inputs) and `view`:

* "deployed": the model the client predicts with after its latest training;
* "local": the model the client ended its latest local training with;
* "received": the model it holds right after taking the server's current model, before training;
* "arriving": the server's model as it lands on the client before training: the received model,
  or, for a method that keeps its personal model and gives the server's to a second one (a
  global model kept beside the personal one, a deputy), that second model.

The answer is logits (N x classes). **Retrogress** at an evaluation is the mean, over the
clients that have trained, of validation accuracy of "local" minus that of "received": how
much a client loses by taking the server's model. The server's model at an evaluation is
what the next round sends, so with every client taking part each round this is exactly the
drop at the moment of receiving it. A method that never overwrites its personal model has zero
retrogress by construction; **shared retrogress** (local minus "arriving") is the drop of the
model that does take the server's, the drop such a method must repair in its second model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from bench.api import ServerHandle, TaskInfo
from bench.config import ConfigError, ExperimentConfig
from bench.data import Dataset
from bench.data.partitions import partition
from bench.seeds import derive_seed
from bench.tracks.base import Stage, Track, register_track

VIEWS = ("deployed", "local", "received", "arriving")
VAL_VIEWS = ("val_local", "val_received", "val_arriving")


@dataclass(frozen=True)
class ClientSplits:
    """Indices of every client's data: training and validation (into the training split),
    test (into the test split)."""

    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]


@dataclass
class ClientRecord:
    """Every evaluation: its round and per-client arrays (NaN where not measured)."""

    evaluations: list[dict[str, Any]] = field(default_factory=list)


def long_tailed(labels: np.ndarray, imbalance: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a long-tailed subset: class c keeps n_max * imbalance^(-c/(C-1))
    of its samples (at least one)."""
    classes = np.unique(labels)
    if imbalance == 1 or len(classes) < 2:
        return np.arange(len(labels))
    n_max = max(int((labels == c).sum()) for c in classes)
    keep = []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        n = max(1, min(len(idx), int(n_max * imbalance ** (-i / (len(classes) - 1)))))
        keep.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(keep))


def deal_test(train_parts: list[np.ndarray], train_y: np.ndarray, test_y: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Test indices per client: class c's test samples in proportion to the clients'
    training samples of c (largest remainder; ties to the lower client id)."""
    counts = np.stack([np.bincount(train_y[p], minlength=int(test_y.max()) + 1) for p in train_parts]).astype(np.float64)
    out: list[list[np.ndarray]] = [[] for _ in train_parts]
    for c in np.unique(test_y):
        held = counts[:, c] if c < counts.shape[1] else np.zeros(len(train_parts))
        if held.sum() == 0:
            continue  # a class nobody trains on has no test samples here
        idx = rng.permutation(np.flatnonzero(test_y == c))
        quota = held / held.sum() * len(idx)
        n = np.floor(quota).astype(int)
        extra = np.argsort(-(quota - n), kind="stable")[: len(idx) - n.sum()]
        n[extra] += 1
        for k, chunk in enumerate(np.split(idx, np.cumsum(n)[:-1])):
            out[k].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in out]


def client_splits(cfg: ExperimentConfig, train_y: np.ndarray, test_y: np.ndarray) -> ClientSplits:
    """The scenario's data of every client, a pure function of the config and the labels."""
    sc, seed = cfg.scenario, cfg.seed
    pool = long_tailed(train_y, sc.imbalance, np.random.default_rng(derive_seed(seed, "pfl-longtail")))
    parts = partition(sc, train_y, pool, np.random.default_rng(derive_seed(seed, "pfl-partition")))
    test = deal_test(parts, train_y, test_y, np.random.default_rng(derive_seed(seed, "pfl-test")))
    rng = np.random.default_rng(derive_seed(seed, "pfl-validation"))
    train, val = [], []
    for p in parts:
        n_val = min(len(p) - 1, max(1, int(round(sc.client_val_fraction * len(p))))) if len(p) >= 2 else 0
        v = np.sort(rng.choice(p, size=n_val, replace=False)) if n_val else np.zeros(0, dtype=np.int64)
        val.append(v)
        train.append(np.setdiff1d(p, v))
    return ClientSplits(tuple(train), tuple(val), tuple(test))


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == y).mean()) if len(y) else float("nan")


def worst_share(acc: np.ndarray, share: float = 0.1) -> float:
    """Mean accuracy of the worst `share` of clients (at least one)."""
    a = np.sort(acc[np.isfinite(acc)])
    return float(a[: max(1, int(np.ceil(share * len(a))))].mean()) if len(a) else float("nan")


@register_track
class Personalized(Track):
    name = "personalized"
    summary = "every client its own data, model and test set; mean / worst-10% client accuracy, retrogress, new clients"
    extra_tables = {
        "clients": pa.schema(
            [
                ("method", pa.string()),
                ("round", pa.int64()),
                ("client", pa.int64()),
                ("new", pa.bool_()),
                ("train_samples", pa.int64()),
                ("test_samples", pa.int64()),
                ("test_acc", pa.float64()),
                ("val_acc", pa.float64()),
                ("val_local", pa.float64()),
                ("val_received", pa.float64()),
                ("val_arriving", pa.float64()),
            ]
        )
    }
    summary_columns = (
        ("acc_mean", pa.float64()),  # test, last round, clients that trained: unweighted mean
        ("acc_weighted", pa.float64()),  # weighted by test samples
        ("acc_std", pa.float64()),
        ("acc_worst10", pa.float64()),
        ("acc_mean_at_val", pa.float64()),  # at the round of best mean validation accuracy
        ("acc_worst10_at_val", pa.float64()),
        ("val_round", pa.int64()),
        ("val_acc", pa.float64()),  # mean validation accuracy at the last round
        ("retrogress", pa.float64()),  # mean over evaluations of mean(val local - val received)
        ("retrogress_shared", pa.float64()),  # the same with the arriving model in place of the received one
        ("new_acc", pa.float64()),  # new clients after local fine-tuning: mean test accuracy
    )
    metric_labels = {
        "acc_mean": ("Client acc. (%)", True, 100, 1),
        "acc_weighted": ("Client acc., weighted (%)", True, 100, 1),
        "acc_std": ("Client acc. std (%)", False, 100, 1),
        "acc_worst10": ("Worst-10% acc. (%)", True, 100, 1),
        "acc_mean_at_val": ("Client acc. at val. round (%)", True, 100, 1),
        "acc_worst10_at_val": ("Worst-10% at val. round (%)", True, 100, 1),
        "val_acc": ("Val. client acc. (%)", True, 100, 1),
        "retrogress": ("Retrogress (%)", False, 100, 2),
        "retrogress_shared": ("Shared retrogress (%)", False, 100, 2),
        "new_acc": ("New-client acc. (%)", True, 100, 1),
    }
    headline = ("acc_mean", "acc_worst10", "retrogress", "new_acc")
    report_metrics = ("acc_mean", "acc_worst10", "retrogress", "retrogress_shared")
    tune_metric = "val_acc"
    own_validation = True
    note = (
        "Per-client test accuracy at the last round of each client's deployed model (mean over clients that trained, "
        "and the mean of the worst 10%). Retrogress: mean over evaluations of a client's validation accuracy with the "
        "model it ended local training with minus that right after taking the server's model; shared retrogress: the same "
        "for the second model that takes the server's, where a method keeps two. 'at val. round': at the "
        "round of best mean validation accuracy."
    )

    def __init__(self, cfg: ExperimentConfig, ds: Dataset, test_x: np.ndarray) -> None:
        super().__init__(cfg, ds, test_x)
        if ds.val_y is not None:
            raise ConfigError(f"the {self.name} track classifies: {ds.name} is a recommendation dataset (use a classification dataset)")
        self.splits = client_splits(cfg, ds.train_y, ds.test_y)
        n = cfg.scenario.num_clients
        rng = np.random.default_rng(derive_seed(cfg.seed, "pfl-new-clients"))
        self.new = sorted(int(k) for k in rng.choice(n, size=cfg.scenario.new_clients, replace=False))
        self.training_clients = [k for k in range(n) if k not in self.new]
        self.with_test = cfg.eval.split != "val"

    @property
    def num_stages(self) -> int:
        return 1

    def stage(self, t: int) -> Stage:
        classes = tuple(range(self.ds.num_classes))
        held = {k: tuple(int(c) for c in np.unique(self.ds.train_y[idx])) for k, idx in enumerate(self.splits.train)}
        return Stage(TaskInfo(t, classes, classes, held), self.splits.train)

    def participants(self, t: int) -> list[int] | None:
        return self.training_clients if self.new else None

    def joiners(self, t: int) -> list[int]:
        return self.new

    def new_record(self) -> ClientRecord:
        return ClientRecord()

    def _score(self, server: ServerHandle, k: int, x: np.ndarray, view: str, kept: dict[str, np.ndarray] | None) -> np.ndarray:
        return np.asarray(server.score({"clients": np.array([k]), "x": x, "view": np.array(view)}, [kept]))

    def evaluate(self, server: ServerHandle, t: int, kept: dict[int, dict[str, np.ndarray]]) -> tuple[float, dict[str, np.ndarray]]:
        """Per client: test and validation accuracy of the deployed model, validation accuracy
        of the local, received and arriving models (clients that have trained); new clients once joined."""
        if self.train_x is None:
            raise RuntimeError("the personalized track evaluates on the clients' validation data: set its train_x")
        n = self.cfg.scenario.num_clients
        out = {name: np.full(n, np.nan) for name in ("test_acc", "val_acc", *VAL_VIEWS)}
        for k in range(n):
            if k in self.new and k not in kept:
                continue  # not joined yet
            vi, ti = self.splits.val[k], self.splits.test[k]
            val_x, val_y = np.asarray(self.train_x[vi]), self.ds.train_y[vi]
            x = np.concatenate([val_x, np.asarray(self.test_x[ti])]) if self.with_test else val_x
            logits = self._score(server, k, x, "deployed", kept.get(k))
            out["val_acc"][k] = accuracy(logits[: len(vi)], val_y)
            if self.with_test:
                out["test_acc"][k] = accuracy(logits[len(vi) :], self.ds.test_y[ti])
            if k in kept:
                for name in VAL_VIEWS:
                    out[name][k] = accuracy(self._score(server, k, val_x, name.removeprefix("val_"), kept[k]), val_y)
        trained = np.array(self.training_clients)
        return float(np.nanmean(out["val_acc"][trained])), out

    def observe(self, record: ClientRecord, t: int, r: int, headline: float, details: dict[str, np.ndarray]) -> None:
        record.evaluations.append({"round": r, **details})

    def end_stage(self, record: ClientRecord, t: int, headline: float, details: Any) -> None:
        """Every evaluation is kept by `observe`."""

    def _test_figures(self, e: dict[str, Any]) -> dict[str, float | None]:
        acc = e["test_acc"][self.training_clients]
        if not self.with_test or not np.isfinite(acc).any():
            return {"acc_mean": None, "acc_weighted": None, "acc_std": None, "acc_worst10": None}
        sizes = np.array([len(self.splits.test[k]) for k in self.training_clients], dtype=np.float64)
        ok = np.isfinite(acc)
        return {
            "acc_mean": float(acc[ok].mean()),
            "acc_weighted": float(np.average(acc[ok], weights=sizes[ok])) if sizes[ok].sum() else None,
            "acc_std": float(acc[ok].std()),
            "acc_worst10": worst_share(acc),
        }

    def summarize(self, record: ClientRecord) -> dict[str, Any]:
        evals, trained = record.evaluations, self.training_clients
        last = evals[-1]
        best = max(evals, key=lambda e: np.nanmean(e["val_acc"][trained]))  # the first of equals: the earliest round

        def mean_drop(view: str) -> float | None:
            drops = [e["val_local"][trained] - e[view][trained] for e in evals]
            drops = [float(np.nanmean(d)) for d in drops if np.isfinite(d).any()]
            return float(np.mean(drops)) if drops else None

        at_val = self._test_figures(best)
        new_acc = last["test_acc"][self.new] if self.new else np.array([])
        return {
            **self._test_figures(last),
            "acc_mean_at_val": at_val["acc_mean"],
            "acc_worst10_at_val": at_val["acc_worst10"],
            "val_round": best["round"],
            "val_acc": float(np.nanmean(last["val_acc"][trained])),
            "retrogress": mean_drop("val_received"),
            "retrogress_shared": mean_drop("val_arriving"),
            "new_acc": float(np.nanmean(new_acc)) if self.with_test and np.isfinite(new_acc).any() else None,
        }

    def rows(self, record: ClientRecord) -> dict[str, list[dict[str, Any]]]:
        def num(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        return {
            "clients": [
                {
                    "round": e["round"],
                    "client": k,
                    "new": k in self.new,
                    "train_samples": len(self.splits.train[k]),
                    "test_samples": len(self.splits.test[k]),
                    **{name: num(e[name][k]) for name in ("test_acc", "val_acc", *VAL_VIEWS)},
                }
                for e in record.evaluations
                for k in range(self.cfg.scenario.num_clients)
                if np.isfinite(e["val_acc"][k])
            ]
        }

    @classmethod
    def figures(cls, rounds: Any, extra: dict[str, Any], style: dict[str, dict]) -> dict[str, Any]:
        """Per-client test accuracy at the last round (one box per method, clients of every
        seed) and retrogress over rounds (mean over clients and seeds)."""
        import matplotlib.pyplot as plt

        out: dict[str, Any] = {}
        clients = extra.get("clients")
        if clients is None or clients.empty:
            return out
        trained = clients[~clients["new"]]
        last = trained[trained["round"] == trained.groupby("run_id")["round"].transform("max")].dropna(subset=["test_acc"])
        if not last.empty:
            methods = sorted(last.method.unique())
            fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(methods) + 2), 3.6))
            ax.boxplot([100 * last[last.method == m].test_acc.to_numpy() for m in methods], showmeans=True)
            ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right")
            ax.set(ylabel="client test accuracy (%)", title="Per-client accuracy at the last round")
            fig.tight_layout()
            out["pfl_client_spread"] = fig
        drops = trained.dropna(subset=["val_local", "val_received"])
        if not drops.empty:
            fig, ax = plt.subplots(figsize=(5, 3.6))
            for m, sel in drops.groupby("method"):
                curve = (100 * (sel.val_local - sel.val_received)).groupby(sel["round"]).mean()
                ax.plot(curve.index + 1, curve.values, label=m, **style.get(m, {}))
            ax.axhline(0, color="0.6", lw=0.8)
            ax.set(xlabel="round", ylabel="retrogress (val. acc. points)", title="Retrogress over rounds")
            ax.legend(fontsize="small")
            out["pfl_retrogress"] = fig
        return out

    def describe(self) -> dict[str, Any]:
        return {"num_tasks": 1, "new_clients": len(self.new), "train_samples": int(sum(len(p) for p in self.splits.train))}
