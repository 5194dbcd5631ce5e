"""Flower as the peer: the small-round workload of `fedame-bench bench-runtime
--small-rounds` (5 clients x 2,000 samples of 512-d features, a linear head, 1 epoch of
batch 64 with SGD, sample-weighted FedAvg) run through Flower's simulation runtime, so its
seconds per round sit beside ours (docs/results.md, "Scale").

Flower is not a dependency of fedame-bench; it runs in a virtual environment of its own:

    python -m venv .venv-flower && .venv-flower/bin/pip install "flwr[simulation]" torch numpy
    python scripts/flower_peer.py export /tmp/small_rounds.npz          # project venv: the same data
    .venv-flower/bin/python scripts/flower_peer.py run /tmp/small_rounds.npz

`export` writes the workload's features, labels and client partition exactly as the harness
builds them; `run` needs only flwr, torch and numpy. Printed: seconds per round (median of
rounds 2..R) beside the figure to compare with.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def export(path: str) -> None:
    from baselines.runtime_study import small_workload
    from bench.data import build_scenario, load_dataset
    from bench.features import FeatureStore
    from bench.sweep import default_cache_dir

    cfg = small_workload([])
    ds = load_dataset(cfg.data, None)
    x = np.asarray(FeatureStore(ds, cfg.backbone, default_cache_dir(cfg)).features("train"), dtype=np.float32)
    parts = build_scenario(cfg.scenario, ds.train_y, ds.class_names, cfg.seed).client_indices[0]
    t = cfg.training
    np.savez(
        path,
        x=x,
        y=ds.train_y.astype(np.int64),
        rounds=t.rounds,
        epochs=t.local_epochs,
        batch=t.batch_size,
        lr=t.lr,
        **{f"client_{k}": ix for k, ix in enumerate(parts)},
    )
    print(f"wrote {path}: {len(parts)} clients, {x.shape[0]} samples of {x.shape[1]}-d features, {t.rounds} rounds")


def run(path: str) -> None:
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    with np.load(path) as f:
        w = {k: f[k] for k in f.files}  # plain arrays: the client function travels to Flower's Ray actors
    n_clients = sum(1 for k in w if k.startswith("client_"))
    rounds, epochs, batch, lr = int(w["rounds"]), int(w["epochs"]), int(w["batch"]), float(w["lr"])
    dim, n_classes = w["x"].shape[1], int(w["y"].max()) + 1

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        ix = w[f"client_{int(context.node_config['partition-id'])}"]
        x, y = torch.from_numpy(w["x"][ix]), torch.from_numpy(w["y"][ix])
        model = torch.nn.Linear(dim, n_classes)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for a in range(0, len(x), batch):
                idx = perm[a : a + batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(x)})})
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()
    stamps: list[float] = []

    def aggregate_metrics(records: list[RecordDict], key: str) -> MetricRecord:
        stamps.append(time.perf_counter())  # called once per round, after the round's aggregation
        return MetricRecord({})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=n_clients,
            min_available_nodes=n_clients,
            train_metrics_aggr_fn=aggregate_metrics,
        )
        strategy.start(grid=grid, initial_arrays=ArrayRecord(torch.nn.Linear(dim, n_classes).state_dict()), num_rounds=rounds)

    run_simulation(server_app, client_app, num_supernodes=n_clients, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    import flwr

    per_round = np.diff(stamps)  # round r's time: from the end of round r-1 to the end of round r (rounds 2..R)
    print(
        f"flower {flwr.__version__}: {n_clients} clients, {rounds} rounds; s/round, median of rounds 2-{rounds}: "
        f"{np.median(per_round):.4f} (min {per_round.min():.4f}, max {per_round.max():.4f})"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["export", "run"])
    p.add_argument("path")
    a = p.parse_args()
    export(a.path) if a.command == "export" else run(a.path)
