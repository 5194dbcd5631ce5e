import numpy as np
import pytest

from bench.config import ScenarioConfig
from bench.scenario import ScenarioError, build_scenario

NAMES = tuple(f"c{i}" for i in range(10))
LABELS = np.repeat(np.arange(10), 100)


def scen(**kw):
    return ScenarioConfig(**{"tasks": [4, 4, 2], "num_clients": 5, **kw})


@pytest.mark.parametrize("partition", ["dirichlet", "iid", "shards"])
def test_each_index_goes_to_exactly_one_client(partition):
    s = build_scenario(scen(partition=partition, alpha=0.3), LABELS, NAMES, seed=1)
    for t, classes in enumerate(s.tasks):
        allx = np.concatenate(s.client_indices[t])
        expected = np.flatnonzero(np.isin(LABELS, classes))
        assert len(allx) == len(expected)
        assert np.array_equal(np.sort(allx), expected)  # every index once, none twice, none foreign


def test_same_seed_same_partition_other_seed_other():
    a = build_scenario(scen(alpha=0.5), LABELS, NAMES, seed=3)
    b = build_scenario(scen(alpha=0.5), LABELS, NAMES, seed=3)
    c = build_scenario(scen(alpha=0.5), LABELS, NAMES, seed=4)
    for t in range(3):
        for k in range(5):
            assert np.array_equal(a.client_indices[t][k], b.client_indices[t][k])
    assert any(not np.array_equal(a.client_indices[0][k], c.client_indices[0][k]) for k in range(5))


def _skew(alpha: float) -> float:
    """Mean over clients of the largest class share in the client's task-0 data."""
    s = build_scenario(scen(alpha=alpha, min_samples=1), LABELS, NAMES, seed=0)
    shares = []
    for ix in s.client_indices[0]:
        h = np.bincount(LABELS[ix], minlength=10)
        shares.append(h.max() / h.sum())
    return float(np.mean(shares))


def test_small_alpha_gives_skewed_histograms():
    assert _skew(0.05) > 0.8  # nearly one class per client
    assert _skew(1000.0) < 0.35  # near-uniform over the task's 4 classes (0.25)


def test_min_samples_guarantee():
    s = build_scenario(scen(alpha=0.1, min_samples=20), LABELS, NAMES, seed=0)
    assert min(len(ix) for task in s.client_indices for ix in task) >= 20


def test_class_order_names_and_seeded_permutation():
    s = build_scenario(scen(class_order=["c9", "c8", 7, 6, 5, 4, 3, 2, 1, 0]), LABELS, NAMES, seed=0)
    assert s.tasks[0] == (9, 8, 7, 6)
    p1 = build_scenario(scen(shuffle_classes=True), LABELS, NAMES, seed=5).class_order
    p2 = build_scenario(scen(shuffle_classes=True), LABELS, NAMES, seed=5).class_order
    assert p1 == p2 and sorted(p1) == list(range(10)) and p1 != tuple(range(10))


def test_n_tasks_equal_parts():
    s = build_scenario(ScenarioConfig(n_tasks=5, num_clients=2), LABELS, NAMES, seed=0)
    assert [len(t) for t in s.tasks] == [2, 2, 2, 2, 2]


def test_split_that_does_not_cover_classes_is_an_error():
    with pytest.raises(ScenarioError, match="covers 8 classes"):
        build_scenario(scen(tasks=[4, 4]), LABELS, NAMES, seed=0)


def test_more_clients_than_samples_is_an_error():
    few = np.repeat(np.arange(10), 2)
    with pytest.raises(ScenarioError, match="fewer than needed"):
        build_scenario(scen(num_clients=50, partition="iid"), few, NAMES, seed=0)
