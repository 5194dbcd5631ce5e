"""Aggregation rules and attacks (bench/federation): on hand-made updates, then end to end
on a small generated task through the runner."""

from pathlib import Path

import numpy as np
import pytest

from bench.api import ClientData, ClientUpdate, Message
from bench.config import AggregationConfig, AttackConfig, ConfigError
from bench.data import load_dataset
from bench.features import FeatureStore
from bench.federation import attack_update, combine, flip_labels, malicious_clients, weighted_average
from bench.loader import load_config
from bench.runner import RunSpec, execute_run
from bench.runtime import LocalExecutor


def updates(values: list[np.ndarray], samples: list[int] | None = None) -> list[ClientUpdate]:
    samples = samples or [10] * len(values)
    return [ClientUpdate({"w": v.astype(np.float32)}, num_samples=n, client_id=i) for i, (v, n) in enumerate(zip(values, samples))]


def honest_and_outlier(rng: np.random.Generator, n_honest: int = 4) -> list[np.ndarray]:
    """Honest clients move the global model (ones) the same way, give or take noise; the
    outlier moves it far in a direction of its own."""
    direction = rng.standard_normal((8, 16))
    honest = [1.0 + 0.5 * direction + 0.05 * rng.standard_normal((8, 16)) for _ in range(n_honest)]
    return [*honest, 1.0 + 50 * rng.standard_normal((8, 16))]


def test_mean_rule_is_exactly_the_weighted_average():
    rng = np.random.default_rng(0)
    ups = updates([rng.standard_normal((8, 16)) for _ in range(5)], [3, 7, 1, 9, 4])
    out = combine(AggregationConfig(), ups, ["w"])
    np.testing.assert_array_equal(out.arrays["w"], weighted_average(ups, ["w"])["w"])
    np.testing.assert_allclose(out.shares, np.array([3, 7, 1, 9, 4]) / 24)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum", "attention"])
def test_robust_rules_ignore_an_outlier_and_give_it_no_share(rule):
    ups = updates(honest_and_outlier(np.random.default_rng(1)))
    reference = {"w": np.ones((8, 16), dtype=np.float32)}
    out = combine(AggregationConfig(rule=rule), ups, ["w"], reference=reference)
    honest = np.mean([u.arrays["w"] for u in ups[:4]], axis=0)
    assert np.abs(out.arrays["w"] - honest).max() < 0.2  # the mean is off by up to ~40
    assert out.shares[4] < 0.01 and out.shares.sum() == pytest.approx(1.0)
    assert not out.fallback


def test_krum_with_too_few_updates_uses_the_median_and_says_so():
    ups = updates(honest_and_outlier(np.random.default_rng(2), n_honest=2))  # 3 < 2f + 3
    out = combine(AggregationConfig(rule="krum", byzantine=1), ups, ["w"])
    assert out.fallback
    np.testing.assert_allclose(out.arrays["w"], np.median(np.stack([u.arrays["w"] for u in ups]), axis=0), rtol=1e-6)


def test_malicious_clients_are_a_seeded_choice_of_the_asked_count():
    a = AttackConfig(kind="sign_flip", clients=2)
    assert malicious_clients(a, 10, 0) == malicious_clients(a, 10, 0)
    assert len(malicious_clients(a, 10, 0)) == 2 and len(set(malicious_clients(a, 10, s) for s in range(6))) > 1
    assert len(malicious_clients(AttackConfig(kind="random", fraction=0.2), 10, 0)) == 2
    assert malicious_clients(AttackConfig(), 10, 0) == ()
    with pytest.raises(ConfigError, match="scenario.attack"):
        malicious_clients(AttackConfig(kind="random", clients=11), 10, 0)


def test_attacks_change_parameters_only_as_defined():
    g = np.ones((4, 4), dtype=np.float32)
    u = ClientUpdate({"w": g + 0.5, "stat_sum": np.full(3, 7.0)}, num_samples=5)
    payload = Message({"w": g})

    def attacked(kind: str, **kw) -> dict[str, np.ndarray]:
        return attack_update(AttackConfig(kind=kind, **kw), payload, u, seed=0).arrays

    np.testing.assert_allclose(attacked("sign_flip", factor=1.0)["w"], g - 0.5)
    np.testing.assert_allclose(attacked("scale", factor=10.0)["w"], g + 5.0)
    np.testing.assert_array_equal(attacked("free_rider")["w"], g)
    noisy = attacked("random")["w"]
    assert noisy.dtype == np.float32 and 0.5 < np.std(noisy - g) < 1.5
    for kind in ("sign_flip", "scale", "free_rider", "random"):
        np.testing.assert_array_equal(attacked(kind)["stat_sum"], u.arrays["stat_sum"])  # not a parameter
    flipped = flip_labels(ClientData(0, np.zeros((4, 2)), np.array([3, 5, 9, 5])))
    assert flipped.y.tolist() == [9, 5, 3, 5]


# ----------------------------------------------------------------------- end to end


def run(tmp_path: Path, *overrides: str):
    """FedAvg on a generated 6-class task, 5 IID clients, one task of 6 rounds."""
    cfg = load_config(
        "smoke",
        [
            "scenario.num_clients=5",
            "scenario.partition=iid",
            "scenario.tasks=[6]",
            "training.rounds=6",
            "data.synthetic.train_per_class=120",
            "data.synthetic.test_per_class=60",
            *overrides,
        ],
    )
    ds = load_dataset(cfg.data, None)
    return execute_run(RunSpec("fedavg", cfg), ds, FeatureStore(ds, cfg.backbone, tmp_path), LocalExecutor(), str(tmp_path))


def test_median_and_krum_recover_what_the_mean_loses_under_sign_flipping(tmp_path):
    clean = run(tmp_path).tables["summary"][0]["final_acc"]
    acc = {rule: run(tmp_path, "scenario.attack.kind=sign_flip", f"aggregation.rule={rule}") for rule in ("mean", "median", "krum")}
    final = {rule: out.tables["summary"][0]["final_acc"] for rule, out in acc.items()}
    assert clean > 0.9
    assert final["mean"] < 0.5  # one client of five reversing its change x4 cancels the others
    assert final["median"] > clean - 0.05 and final["krum"] > clean - 0.05
    runs = acc["krum"].tables["runs"][0]
    assert runs["attack"] == "sign_flip x1" and runs["aggregation"] == "krum" and len(eval(runs["malicious"])) == 1
    rounds = acc["krum"].tables["rounds"]
    assert all(r["malicious_share"] == 0.0 for r in rounds)
    assert all(r["malicious_share"] == pytest.approx(0.2, abs=0.05) for r in acc["mean"].tables["rounds"])


def test_attention_gives_a_random_update_less_weight_than_any_honest_client(tmp_path):
    import json

    from bench.plot import plot
    from bench.results import ResultWriter

    out = run(tmp_path, "scenario.attack.kind=random", "aggregation.rule=attention")
    bad = set(json.loads(out.tables["runs"][0]["malicious"]))
    for r in out.tables["rounds"]:
        shares = {int(k): v for k, v in json.loads(r["agg_shares"]).items()}
        assert max(shares[k] for k in bad) < min(v for k, v in shares.items() if k not in bad)
    ResultWriter(tmp_path / "results").write_run(out.tables["runs"][0]["run_id"], out.tables)
    written = {p.name for p in plot([tmp_path / "results"], tmp_path / "figures")}
    assert {"malicious_share.png", "attention_weights.png"} <= written


def test_without_an_attack_every_rule_learns_what_the_mean_learns(tmp_path):
    mean = run(tmp_path).tables["summary"][0]["final_acc"]
    for rule in ("median", "trimmed_mean", "krum", "multi_krum", "attention"):
        out = run(tmp_path, f"aggregation.rule={rule}")
        assert abs(out.tables["summary"][0]["final_acc"] - mean) <= 0.05, rule
        assert all(r["malicious_share"] is None for r in out.tables["rounds"])


def test_run_ids_change_with_an_attack_or_a_rule_but_not_with_unused_settings():
    base = RunSpec("fedavg", load_config("smoke", [])).run_id
    assert RunSpec("fedavg", load_config("smoke", ["aggregation.trim=0.3"])).run_id == base  # mean ignores it
    assert RunSpec("fedavg", load_config("smoke", ["scenario.attack.factor=2"])).run_id == base  # no attack
    assert RunSpec("fedavg", load_config("smoke", ["aggregation.rule=median"])).run_id != base
    assert RunSpec("fedavg", load_config("smoke", ["scenario.attack.kind=random"])).run_id != base
