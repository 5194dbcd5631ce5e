"""Reference methods: AFCL equals centralised ridge and FeCAM equals centralised FeCAM
whatever the partition; joint does not depend on the partition; one round per task."""

import numpy as np
import pytest

from bench.api import ClientData, MethodEnv, TaskInfo, TrainContext, TrainSettings, get_method
from bench.data import load_dataset
from bench.features import FeatureStore
from bench.federation import mean_aggregator
from bench.loader import load_config
from bench.runner import RunSpec, execute_run
from bench.runtime import LocalExecutor

D, K = 6, 4


def _env(seed=0):
    return MethodEnv(
        aggregator=mean_aggregator(),
        feature_dim=D,
        num_classes=K,
        class_names=tuple("abcd"),
        dataset="x",
        run_seed=seed,
        num_clients=3,
        train=TrainSettings(1, 8, "sgd", 0.1, 0.0, 0.0),
    )


def _data(rng, n=120):
    y = rng.integers(0, K, n)
    x = (rng.normal(size=(n, D)) + 2.0 * np.eye(K, D)[y]).astype(np.float32)
    return x, y


def federate(name, cfg, x, y, cuts, tasks=((0, 1), (2, 3)), seed=0):
    """Run `name`'s server and clients by hand: tasks of classes, clients cut at `cuts`."""
    cls = get_method(name)
    server, client = cls(cfg, _env(seed)), cls.ClientClass(cfg, _env(seed))
    server.setup()
    seen: tuple[int, ...] = ()
    for t, classes in enumerate(tasks):
        seen = seen + classes
        idx = np.flatnonzero(np.isin(y, classes))
        parts = np.split(idx, cuts)
        server.begin_task(TaskInfo(t, classes, seen, {k: classes for k in range(len(parts))}))
        ctx = TrainContext(seed, t, 0, 0, _env().train)
        server.aggregate([client.local_train(server.payload_for(k), ClientData(k, x[p], y[p]), ctx) for k, p in enumerate(parts)])
    return server


@pytest.mark.parametrize("expansion", [0, 32])
def test_afcl_equals_centralised_ridge_for_any_partition(expansion):
    from baselines.afcl import AFCLConfig, expand

    rng = np.random.default_rng(1)
    x, y = _data(rng)
    cfg = AFCLConfig(ridge=0.5, expansion=expansion)
    phi = expand(x, cfg, _env())
    central = np.linalg.solve(phi.T @ phi + 0.5 * np.eye(phi.shape[1]), phi.T @ np.eye(K)[y])
    for cuts in ([10, 30], [5], [20, 21, 50, 51]):
        server = federate("afcl", cfg, x, y, cuts)
        np.testing.assert_allclose(server.weights, central, rtol=1e-9, atol=1e-10)
    acc = (server.predict(x) == y).mean()
    assert acc > 0.8  # separable classes: the ridge classifier learns them


def test_fecam_equals_centralised_fecam_for_any_partition():
    from baselines.fecam import FeCAMConfig, shrunk_precision, transform

    rng = np.random.default_rng(2)
    x, y = _data(rng)
    x = np.abs(x)  # non-negative like ReLU features, so the Tukey transform is the paper's
    cfg = FeCAMConfig()
    servers = [federate("fecam", cfg, x, y, cuts) for cuts in ([10, 30], [7], [1, 2, 3])]
    for c in range(K):
        xc = transform(x[y == c], cfg.tukey_beta)
        prec = shrunk_precision(np.cov(xc.T), cfg)
        for s in servers:
            np.testing.assert_allclose(s.means[c], xc.mean(0), rtol=1e-9)
            np.testing.assert_allclose(s.precisions[c], prec, rtol=1e-7, atol=1e-9)
    preds = [s.predict(x) for s in servers]
    assert all((p == preds[0]).all() for p in preds)
    assert (preds[0] == y).mean() > 0.6
    # no shrinkage and no normalisation change the classifier
    other = federate("fecam", FeCAMConfig(shrink_diag=0, shrink_offdiag=0, normalize_cov=False, tukey_beta=None), x, y, [10, 30])
    assert not np.allclose(other.precisions[0], servers[0].precisions[0])


def _run(method, tmp_path, *overrides):
    cfg = load_config("smoke", list(overrides))
    ds = load_dataset(cfg.data, None)
    return execute_run(RunSpec(method, cfg), ds, FeatureStore(ds, cfg.backbone, tmp_path), LocalExecutor(), str(tmp_path))


@pytest.mark.parametrize("method", ["afcl", "joint", "fecam"])
def test_references_do_not_depend_on_alpha_and_take_one_round_per_task(method, tmp_path):
    runs = [_run(method, tmp_path, f"scenario.alpha={a}") for a in (0.1, 5.0)]
    acc = [[r["accuracy"] for r in out.tables["accuracy"]] for out in runs]
    np.testing.assert_allclose(acc[0], acc[1], atol=1e-12)
    assert len(runs[0].tables["rounds"]) == 3  # 3 tasks, one round each (training.rounds is 3)
    assert runs[0].summary["final_acc"] > 1 / 6  # above chance on the 6 synthetic classes


def test_statistics_methods_keep_configured_rounds_under_partial_participation(tmp_path):
    out = _run("afcl", tmp_path, "training.client_fraction=0.5")
    assert len(out.tables["rounds"]) == 9


def test_fedncm_under_partial_participation_uses_every_client_that_reported(tmp_path):
    """Each round samples some clients; the means must come from all of them, not only the
    last round's (the earlier FedNCM overwrote its means with the last round's sums)."""
    full = _run("fedncm", tmp_path)
    partial = _run("fedncm", tmp_path, "training.client_fraction=0.67", "training.rounds=12")
    assert len(full.tables["rounds"]) == 3 and len(partial.tables["rounds"]) == 36
    # 12 rounds of 2 of 3 clients: every client reports in every task, so the means are the full ones
    assert [r["accuracy"] for r in partial.tables["accuracy"]] == [r["accuracy"] for r in full.tables["accuracy"]]


def test_joint_adds_the_pooled_class_gaussians_to_its_head():
    """joint's Gaussians are FeCAM's on the pooled data; gaussian_weight 0 is the head alone, and
    a large weight turns joint into FeCAM's nearest class."""
    from baselines.fecam import FeCAMConfig
    from baselines.joint import JointConfig

    rng = np.random.default_rng(3)
    x, y = _data(rng)
    x = np.abs(x)
    fecam = federate("fecam", FeCAMConfig(), x, y, [10, 30])
    joint = federate("joint", JointConfig(), x, y, [10, 30])
    for c in range(K):
        np.testing.assert_allclose(joint.gaussians[c][0], fecam.means[c], rtol=1e-9)
        np.testing.assert_allclose(joint.gaussians[c][1], fecam.precisions[c], rtol=1e-7, atol=1e-9)
    head_only = federate("joint", JointConfig(gaussian_weight=0), x, y, [10, 30])
    assert not head_only.gaussians
    dominated = federate("joint", JointConfig(gaussian_weight=1e6), x, y, [10, 30])
    np.testing.assert_array_equal(dominated.predict(x), fecam.predict(x))
    assert (joint.predict(x) == y).mean() >= (head_only.predict(x) == y).mean() - 0.05
