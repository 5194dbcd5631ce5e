import numpy as np
import pytest

from bench.config import ScenarioConfig
from bench.data import ScenarioError, build_scenario

NAMES = tuple(f"c{i}" for i in range(10))
LABELS = np.repeat(np.arange(10), 100)


def scen(**kw):
    return ScenarioConfig(**{"tasks": [4, 4, 2], "num_clients": 5, **kw})


@pytest.mark.parametrize("partition", ["dirichlet", "iid", "shards", "label_quantity", "quantity"])
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


@pytest.mark.parametrize("k", [1, 2])
def test_label_quantity_gives_each_client_k_classes_of_each_task(k):
    s = build_scenario(scen(partition="label_quantity", classes_per_client=k), LABELS, NAMES, seed=2)
    for t in range(3):
        held = s.client_classes(t, LABELS)
        assert all(len(c) == k for c in held.values()), held
        assert set().union(*held.values()) == set(s.tasks[t])  # every class of the task is held by someone
    again = build_scenario(scen(partition="label_quantity", classes_per_client=k), LABELS, NAMES, seed=2)
    assert all(np.array_equal(a, b) for ta, tb in zip(s.client_indices, again.client_indices) for a, b in zip(ta, tb))
    with pytest.raises(ScenarioError, match="classes_per_client=3"):
        build_scenario(scen(partition="label_quantity", classes_per_client=3), LABELS, NAMES, seed=2)  # task 2 has 2


def test_quantity_skew_varies_sizes_not_label_mix():
    s = build_scenario(scen(partition="quantity", alpha=0.2, min_samples=5), LABELS, NAMES, seed=0)
    sizes = s.counts(LABELS)[0]
    assert sizes.max() > 3 * sizes.min() and sizes.min() >= 5  # skewed sizes ...
    big = s.client_indices[0][int(np.argmax(sizes))]
    shares = np.bincount(LABELS[big], minlength=10)[list(s.tasks[0])] / len(big)
    assert np.all(np.abs(shares - 0.25) < 0.1)  # ... of IID contents (4 classes, about a quarter each)
    near_even = build_scenario(scen(partition="quantity", alpha=1000.0), LABELS, NAMES, seed=0).counts(LABELS)[0]
    assert near_even.max() < 1.3 * near_even.min()


def test_feature_noise_grows_with_the_client_and_is_seeded():
    from bench.data.scenario import client_noise
    from bench.runtime.base import TaskData

    s = build_scenario(scen(partition="iid", feature_noise=0.4), LABELS, NAMES, seed=0)
    assert s.noise_std == pytest.approx((0.0, 0.1, 0.2, 0.3, 0.4))
    x = np.zeros((len(LABELS), 64), dtype=np.float32)
    noise = client_noise(s, seed=0, task=0)
    data = TaskData(x, LABELS, dict(enumerate(s.client_indices[0])), "cpu", noise)
    measured = [float(np.std(data[k].x)) for k in range(5)]
    assert measured[0] == 0 and np.allclose(measured[1:], [0.1, 0.2, 0.3, 0.4], rtol=0.05)
    again = TaskData(x, LABELS, dict(enumerate(s.client_indices[0])), "cpu", client_noise(s, seed=0, task=0))
    assert np.array_equal(again[3].x, data[3].x)
    other = TaskData(x, LABELS, dict(enumerate(s.client_indices[0])), "cpu", client_noise(s, seed=1, task=0))
    assert not np.array_equal(other[3].x, data[3].x)
    assert build_scenario(scen(partition="iid"), LABELS, NAMES, seed=0).noise_std is None


def test_domain_incremental_tasks_are_domains_with_all_their_classes():
    domains = np.repeat(np.arange(3), len(LABELS) // 3 + 1)[: len(LABELS)]
    rng = np.random.default_rng(0)
    labels = rng.permutation(LABELS)  # every domain holds every class
    names = ("sketch", "photo", "clipart")
    s = build_scenario(
        ScenarioConfig(tasks_by="domain", domain_order=["photo", "sketch", "clipart"], num_clients=4), labels, NAMES, 0, domains, names
    )
    assert s.domain_order == (1, 0, 2) and s.num_tasks == 3
    assert all(set(t) == set(range(10)) for t in s.tasks)
    assert s.new_classes(0) == s.tasks[0] and s.new_classes(1) == () and len(s.seen_classes(2)) == 10
    for t, d in enumerate(s.domain_order):  # task t trains on domain d's samples only
        assert np.array_equal(np.sort(np.concatenate(s.client_indices[t])), np.flatnonzero(domains == d))
    test_domain = np.array([0, 1, 2, 1])
    assert s.test_tasks(np.array([3, 3, 3, 3]), test_domain).tolist() == [1, 0, 2, 0]  # by domain, not by class
    with pytest.raises(ScenarioError, match="unknown domains"):
        build_scenario(ScenarioConfig(tasks_by="domain", domain_order=["paint"]), labels, NAMES, 0, domains, names)
    with pytest.raises(ScenarioError, match="needs a dataset with domains"):
        build_scenario(ScenarioConfig(tasks_by="domain"), labels, NAMES, 0)
