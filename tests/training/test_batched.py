"""Batched client simulation (runtime.batch_clients): many clients of a round trained as
one stacked computation give the per-client path's numbers, to float rounding."""

import numpy as np
import pytest

from bench.api import ClientData, TaskInfo, TrainContext, get_method
from bench.data import build_scenario, load_dataset
from bench.features import FeatureStore
from bench.loader import load_config, method_config
from bench.runner import RunSpec, execute_run, method_env
from bench.runtime import LocalExecutor

TOL = 1e-5  # absolute, on every trained weight: the stacked matmuls sum in another order


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cfg = load_config("smoke", ["scenario.num_clients=6", "scenario.alpha=0.3", "training.batch_size=7"])
    ds = load_dataset(cfg.data, None)
    store = FeatureStore(ds, cfg.backbone, tmp_path_factory.mktemp("cache"))
    return cfg, ds, store


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("fedavg", ["training.optimizer=sgd", "training.momentum=0.9", "training.weight_decay=1e-3", "training.local_epochs=2"]),
        ("fedprox", ["methods.fedprox.mu=0.5", "training.optimizer=adam", "training.lr=0.01"]),
        ("fedlwf", ["methods.fedlwf.head=mlp", "methods.fedlwf.hidden=16"]),
    ],
)
def test_batched_clients_equal_the_per_client_path(smoke, method, overrides, tmp_path):
    cfg0, ds, store = smoke
    cfg = load_config("smoke", ["scenario.num_clients=6", "scenario.alpha=0.3", "training.batch_size=7", *overrides])
    feats = np.asarray(store.features("train"))
    env = method_env(cfg, ds, feats.shape[1], str(tmp_path))
    cls = get_method(method)
    mcfg = method_config(cfg, method)
    server = cls(mcfg, env)
    server.setup()
    scen = build_scenario(cfg.scenario, ds.train_y, ds.class_names, cfg.seed)
    for t in range(2):  # task 1: FedLwF distils from task 0's head
        server.begin_task(TaskInfo(t, scen.tasks[t], scen.seen_classes(t), scen.client_classes(t, ds.train_y)))
        datas = [ClientData(k, feats[ix], ds.train_y[ix]) for k, ix in enumerate(scen.client_indices[t])]
        ctxs = [TrainContext(cfg.seed, t, 0, k, env.train) for k in range(len(datas))]
        payload = server.payload_for(0)
        client = cls.ClientClass(mcfg, env)
        one = [client.local_train(payload, d, c) for d, c in zip(datas, ctxs)]
        many = client.local_train_batch(payload, datas, ctxs)
        assert len({len(d.y) for d in datas}) > 1  # clients of different sizes: different step counts and last batches
        for a, b in zip(one, many):
            assert a.arrays.keys() == b.arrays.keys() and a.num_samples == b.num_samples
            for k in a.arrays:
                np.testing.assert_allclose(b.arrays[k], a.arrays[k], rtol=0, atol=TOL)
            assert b.loss == pytest.approx(a.loss, abs=TOL)
        moved = max(float(np.abs(a.arrays[k] - payload.arrays[k]).max()) for a in one for k in a.arrays)
        assert moved > 100 * TOL  # training moved the weights far more than the tolerance
        server.aggregate(one)
        server.end_task()


def test_a_batched_run_reproduces_the_per_client_run_and_is_its_own_run(smoke, tmp_path):
    cfg, ds, store = smoke
    batched = load_config("smoke", ["scenario.num_clients=6", "scenario.alpha=0.3", "training.batch_size=7", "runtime.batch_clients=true"])
    a = execute_run(RunSpec("fedprox", cfg), ds, store, LocalExecutor(cfg.runtime), str(tmp_path))
    b = execute_run(RunSpec("fedprox", batched), ds, store, LocalExecutor(batched.runtime), str(tmp_path))
    acc = [[r["accuracy"] for r in out.tables["accuracy"]] for out in (a, b)]
    np.testing.assert_allclose(acc[1], acc[0], atol=1 / 40)  # at most one test image of 40 per class may flip
    assert RunSpec("fedprox", cfg).run_id != RunSpec("fedprox", batched).run_id
    assert RunSpec("fedame", cfg).run_id == RunSpec("fedame", batched).run_id  # no batched path: the same run
