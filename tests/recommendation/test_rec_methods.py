"""FedDMMR's parts and switches, and the references: each part carries what it claims."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from baselines.rec import memory
from baselines.rec.features import FeatureFileError
from baselines.rec.method import FedDMMR, RecClient, RecServer, windows
from bench.api import ClientData, ClientUpdate, TrainContext
from bench.federation import RuleAggregator
from bench.loader import method_config
from bench.runner import method_env
from tests.conftest import numbers
from tests.recommendation.conftest import rec_cfg, run_rec


def stats_of(out) -> list[dict]:
    import json

    return [json.loads(r["stats"]) if r["stats"] else {} for r in out.tables["rounds"]]


def test_feddmmr_with_the_sequential_expert_alone_is_fedavg_over_sasrec(rec_data):
    """The ablation's first row: no memory experts, no router, no memory, no prototypes."""
    plain = ("methods.feddmmr.experts=[sequential]", "methods.feddmmr.memory.enabled=false", "methods.feddmmr.prototypes=false")
    _, a = run_rec("feddmmr", rec_data, "training.rounds=3", *plain)
    _, b = run_rec("fedavg_sasrec", rec_data, "training.rounds=3")
    strip = lambda t: [{k: v for k, v in r.items() if k not in ("run_id", "method")} for r in t]  # noqa: E731
    assert strip(numbers(a)["ranking"]) == strip(numbers(b)["ranking"])
    assert [r["loss"] for r in a.tables["rounds"]] == [r["loss"] for r in b.tables["rounds"]]


def test_without_a_visual_file_the_visual_expert_is_off_said_and_recorded(rec_data, caplog):
    with caplog.at_level(logging.WARNING):
        _, out = run_rec("feddmmr", rec_data, "training.rounds=2")
    assert "the visual expert is off" in caplog.text
    usage = stats_of(out)[-1]
    assert set(k for k in usage if k.startswith("usage_")) == {"usage_sequential", "usage_semantic"}
    assert usage["usage_sequential"] + usage["usage_semantic"] == pytest.approx(1.0)
    cfg = rec_cfg(rec_data[0])
    assert FedDMMR.identity(method_config(cfg, "feddmmr")) == {"experts_off": ["visual"]}  # in the run id


def test_a_visual_file_turns_the_visual_expert_on_and_a_wrong_one_is_one_error(rec_data, tmp_path):
    n_items = rec_data[1].num_classes
    good, bad = tmp_path / "visual.npy", tmp_path / "bad.npy"
    np.save(good, np.random.default_rng(0).normal(size=(n_items, 16)).astype(np.float32))  # test data standing in for poster features
    np.save(bad, np.zeros((n_items - 1, 16), np.float32))
    _, out = run_rec("feddmmr", rec_data, "training.rounds=2", f"methods.feddmmr.visual_features={good}")
    assert {"usage_sequential", "usage_visual", "usage_semantic"} <= set(stats_of(out)[-1])
    with pytest.raises(FeatureFileError, match="one row per item"):
        run_rec("feddmmr", rec_data, "training.rounds=1", f"methods.feddmmr.visual_features={bad}")


def test_the_load_balance_term_pulls_expert_usage_toward_uniform(rec_data):
    def imbalance(weight: str) -> float:
        _, out = run_rec("feddmmr", rec_data, "training.rounds=4", f"methods.feddmmr.load_balance_weight={weight}")
        return abs(stats_of(out)[-1]["usage_semantic"] - 0.5)

    assert imbalance("20") < imbalance("0") - 0.1


def one_client(rec_data, *overrides: str):
    """A FedDMMR server and client on the world, and client 0's data."""
    root, ds, _, cache = rec_data
    cfg = rec_cfg(root, *overrides)
    env = method_env(cfg, ds, 0, str(cache))
    env = type(env)(**{**env.__dict__, "aggregator": RuleAggregator(cfg.aggregation, 0)})
    mcfg = method_config(cfg, "feddmmr")
    server = FedDMMR(mcfg, env)
    server.setup()
    rows = np.flatnonzero(ds.train_x[:, 0] == 0)
    data = ClientData(0, ds.train_x[rows], ds.train_y[rows])
    return server, RecClient(mcfg, env), data, env


def test_the_memory_keeps_surprising_items_on_the_device_and_prototypes_come_back(rec_data):
    server, client, data, env = one_client(rec_data, "methods.feddmmr.memory.surprise_threshold=0", "methods.feddmmr.memory.capacity=6")
    ctx = TrainContext(0, 0, 0, 0, env.train)
    update = client.local_train(server.payload_for(0), data, ctx)
    assert update.kept is not None and "mem_items" not in update.arrays  # kept, not sent
    seq = list(data.y)
    assert list(update.kept["mem_items"]) == seq[1:][-6:]  # every next item (threshold 0), the newest six
    assert update.arrays["proto_centres"].shape == (5, 384)
    server.aggregate([update])
    assert server.payload_for(0).arrays["prototypes"].shape == (5, 384)
    again = client.local_train(server.payload_for(0), data, TrainContext(0, 0, 1, 0, env.train, kept=update.kept))
    assert len(again.kept["mem_items"]) == 6


def test_an_update_sends_only_the_item_rows_training_touched(rec_data):
    server, client, data, env = one_client(rec_data)
    update = client.local_train(server.payload_for(0), data, TrainContext(0, 0, 0, 0, env.train))
    rows = set(update.arrays["item_rows"].tolist())
    assert set((np.asarray(data.y) + 1).tolist()) <= rows and len(rows) < env.num_classes
    assert update.arrays["item_emb_rows"].shape == (len(rows), 64)
    assert "model.encoder.item_emb.weight" not in update.arrays


def test_item_rows_are_averaged_over_the_clients_that_sent_them():
    table = np.zeros((5, 2), np.float32)
    a = ClientUpdate(arrays={"item_rows": np.array([1, 2]), "item_emb_rows": np.array([[1, 1], [2, 2]], np.float32)}, num_samples=1)
    b = ClientUpdate(arrays={"item_rows": np.array([2, 3]), "item_emb_rows": np.array([[5, 5], [3, 3]], np.float32)}, num_samples=3)
    out = RecServer.averaged_rows(table, [a, b])
    assert out.tolist() == [[0, 0], [1, 1], [4.25, 4.25], [3, 3], [0, 0]]  # row 2: (1 x 2 + 3 x 5) / 4; rows nobody sent stay


def test_memory_writes_over_the_threshold_evicts_the_oldest_and_reads_the_most_surprising():
    kept = memory.write(None, np.array([1, 2, 3, 4]), np.array([0.9, 0.2, 0.7, 0.8]), threshold=0.5, capacity=2)
    assert kept["mem_items"].tolist() == [3, 4]  # 1 was evicted, 2 never passed
    kept = memory.write(kept, np.array([3]), np.array([0.95]), threshold=0.5, capacity=2)
    assert kept["mem_items"].tolist() == [4, 3]  # written again: now the newest
    assert memory.read(kept, 1).tolist() == [3]


def test_windows_cover_every_next_item_once():
    seq = np.arange(7)
    w = windows(seq, 4)
    targets = sorted(int(t) - 1 for t in w[:, 1].ravel() if t > 0)
    assert targets == list(range(1, 7)) and w.shape == (2, 2, 4)
    assert torch.equal(torch.as_tensor(w[0, 1]), torch.tensor([4, 5, 6, 7]))  # the newest window first, shifted ids


def test_the_central_reference_uploads_each_sequence_once(rec_data):
    _, out = run_rec("sasrec", rec_data, "training.rounds=3")
    ds = rec_data[1]
    assert sum(r["bytes_up"] for r in out.tables["rounds"]) == ds.train_y[:].nbytes  # int64 sequences, once
    assert [r["bytes_up"] for r in out.tables["rounds"]][1:] == [0, 0]


def test_popularity_ranks_by_training_counts(rec_data):
    root, ds, _, cache = rec_data
    _, out = run_rec("popularity", rec_data, "training.rounds=3")
    assert len(out.tables["rounds"]) == 1  # exact after one round of every client
    from baselines.rec.reference import Popularity

    cfg = rec_cfg(root)
    server = Popularity(method_config(cfg, "popularity"), method_env(cfg, ds, 0, str(cache)))
    server.setup()
    items, counts = np.unique(ds.train_y, return_counts=True)
    server.aggregate([ClientUpdate(arrays={"items": items, "counts": counts}, num_samples=len(ds.train_y))])
    scores = server.score({"history": np.zeros((2, 1), np.int64)}, [None, None])
    assert np.array_equal(scores[0], np.bincount(ds.train_y, minlength=ds.num_classes).astype(np.float32))


def test_aggregation_rules_and_attacks_apply_to_the_shared_model(rec_data):
    _, clean = run_rec("fedavg_sasrec", rec_data, "training.rounds=2", "aggregation.rule=median")
    _, attacked = run_rec(
        "fedavg_sasrec",
        rec_data,
        "training.rounds=2",
        "aggregation.rule=median",
        "scenario.attack.kind=sign_flip",
        "scenario.attack.clients=3",
    )
    rows = attacked.tables["rounds"]
    assert all(r["malicious_share"] is not None for r in rows) and rows[-1]["agg_shares"]
    assert [r["loss"] for r in rows] != [r["loss"] for r in clean.tables["rounds"]]  # the attack reached the model


def test_report_and_plot_read_a_recommendation_sweep(rec_data, tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app

    out = tmp_path / "res"
    args = ["run", "-c", "ml100k", "--methods", "feddmmr,popularity", "--data-dir", str(rec_data[0]), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--set", "scenario.num_clients=40", "--set", "training.rounds=2", "--set", "eval.every=1"])
    assert res.exit_code == 0, res.output
    assert "hr10" in res.output and "final_acc" not in res.output  # the sweep's table shows the track's columns
    table = CliRunner().invoke(app, ["report", str(out)])
    assert table.exit_code == 0 and "HR@10 (%)" in table.output and "NDCG@10 full (%)" in table.output, table.output
    assert "99 sampled negatives" in table.output  # the track's footnote
    figs = CliRunner().invoke(app, ["plot", str(out), "-o", str(tmp_path / "fig")])
    assert figs.exit_code == 0, figs.output
    assert (tmp_path / "fig" / "rec_hr10_rounds.png").exists() and (tmp_path / "fig" / "rec_expert_usage.png").exists()
    assert not (tmp_path / "fig" / "forgetting.png").exists()  # no class-incremental figures for it
