"""Many clients: work and memory follow the clients sampled per round, not the total."""

from bench.data import load_dataset
from bench.features import FeatureStore
from bench.loader import load_config
from bench.runner import RunSpec, execute_run
from bench.runtime import LocalExecutor


def test_only_sampled_clients_get_data_and_payloads(tmp_path):
    cfg = load_config(
        "smoke",
        ["data.synthetic.train_per_class=200", "scenario.num_clients=100", "scenario.partition=iid", "training.client_fraction=0.05"],
    )
    ds = load_dataset(cfg.data, None)
    store = FeatureStore(ds, cfg.backbone, tmp_path)
    ex = LocalExecutor(cfg.runtime)
    out = execute_run(RunSpec("fedavg", cfg), ds, store, ex, str(tmp_path))
    last_task = [r for r in out.tables["rounds"] if r["task"] == 2]
    assert all(r["clients_used"] == 5 for r in out.tables["rounds"])
    assert 5 <= len(ex.data.built) <= 5 * len(last_task) < 100  # data built for the last task's sampled clients only
    assert len(ex.data.indices) == 100  # (the partition itself covers every client)
