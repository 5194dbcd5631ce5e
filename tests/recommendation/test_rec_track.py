"""The sequential_rec track's protocol: metrics on hand-made cases, the evaluation negatives,
and the leak the protocol exists to prevent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.rec.method import banned_items, negatives_for
from bench.data.movielens import load_movielens
from bench.loader import load_config
from bench.tracks.sequential_rec import NEGATIVES, SequentialRec, expected_hits, rank_metrics
from tests.recommendation.world import rec_overrides, world


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    root = world(tmp_path_factory.mktemp("ml"))
    cfg = load_config("ml100k", rec_overrides(root))
    ds = load_movielens(root)
    return cfg, ds


def test_expected_hits_on_hand_made_ranks():
    hr, ndcg = expected_hits(np.array([0, 9, 10, 5, 0]), np.array([0, 0, 0, 9, 99]))
    assert hr.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.5, 0.1])
    assert ndcg[0] == pytest.approx(1.0) and ndcg[1] == pytest.approx(1 / np.log2(11)) and ndcg[2] == 0.0
    assert ndcg[3] == pytest.approx(sum(1 / np.log2(p + 2) for p in range(5, 10)) / 10)


def test_a_constant_scorer_gets_chance_and_a_perfect_one_gets_everything():
    n_items, target = 500, np.array([3, 7])
    negatives = np.stack([np.arange(100, 199), np.arange(200, 299)])
    flat = rank_metrics(np.zeros((2, n_items)), target, negatives, [np.array([1, 2]), np.array([4])])
    assert flat["hr10"] == pytest.approx(10 / 100)
    assert flat["hr10_full"] == pytest.approx(np.mean([10 / 498, 10 / 499]))
    perfect = np.zeros((2, n_items))
    perfect[[0, 1], target] = 1.0
    assert rank_metrics(perfect, target, negatives, [np.array([1]), np.array([4])]) == pytest.approx(
        {"hr10": 1.0, "ndcg10": 1.0, "hr10_full": 1.0, "ndcg10_full": 1.0}
    )


def test_full_ranking_leaves_the_history_out():
    scores = np.zeros((1, 300))
    scores[0, :20] = 5.0  # the user's history scores highest
    scores[0, 50] = 1.0  # the target is next
    negatives = np.arange(100, 199)[None]
    with_history = rank_metrics(scores, np.array([50]), negatives, [np.arange(20)])
    without = rank_metrics(scores, np.array([50]), negatives, [np.arange(0)])
    assert with_history["hr10_full"] == 1.0 and without["hr10_full"] == 0.0


def test_evaluation_negatives_come_from_the_run_seed_and_avoid_every_interaction(rec):
    cfg, ds = rec
    a, b = SequentialRec(cfg, ds, ds.test_x), SequentialRec(cfg, ds, ds.test_x)
    other = SequentialRec(cfg.model_copy(update={"seed": 1}), ds, ds.test_x)
    for split in ("val", "test"):
        assert np.array_equal(a.negatives[split], b.negatives[split])  # every method ranks the same candidates
        assert not np.array_equal(a.negatives[split], other.negatives[split])
        assert a.negatives[split].shape == (len(a.users), NEGATIVES)
    assert not np.array_equal(a.negatives["val"], a.negatives["test"])  # each split its own set
    for i in range(len(a.users)):
        seen = set(a.train_seq[i]) | {a.val_target[i], a.test_target[i]}
        assert not seen & set(a.negatives["val"][i]) and not seen & set(a.negatives["test"][i])
        assert len(set(a.negatives["test"][i])) == NEGATIVES


def negative_counts(seqs: list[np.ndarray], n_items: int, banned: torch.Tensor, draws: int = 400) -> np.ndarray:
    """How often each item was drawn as a training negative per user (many rounds of a client)."""
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros((len(seqs), n_items + 1))
    for _ in range(draws):
        neg = negatives_for(banned, 4, gen).numpy()
        for i in range(len(seqs)):
            np.add.at(counts[i], neg[i], 1)
    return counts[:, 1:]


def test_a_model_that_memorises_its_training_negatives_learns_nothing_about_the_test_item(rec):
    """The known leak: training negatives drawn to exclude the test item let a local-only
    model learn that the test item is never a negative (HR@10 near 1). A scorer that ranks
    items by how rarely they were a user's training negative shows it: on this track's
    clients it scores chance; with the leaky sampler (test items banned too), near 1."""
    cfg, ds = rec
    track = SequentialRec(cfg, ds, ds.test_x)
    n = ds.num_classes
    honest = banned_items(track.train_seq, n, "cpu")
    leaky = banned_items([np.append(s, t) for s, t in zip(track.train_seq, track.test_target)], n, "cpu")
    hist = track.history("test")
    scores = {name: -negative_counts(track.train_seq, n, banned) for name, banned in (("honest", honest), ("leaky", leaky))}
    honest_hr = rank_metrics(scores["honest"], track.test_target, track.negatives["test"], hist)["hr10"]
    leaky_hr = rank_metrics(scores["leaky"], track.test_target, track.negatives["test"], hist)["hr10"]
    assert leaky_hr > 0.9  # the check can fail: the leak shows when it is there
    assert honest_hr < 0.3  # chance is 0.1
