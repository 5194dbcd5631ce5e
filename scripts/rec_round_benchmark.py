"""What the harness adds to a federated recommendation round (docs/recommendation.md, "Speed").

For FedAvg over SASRec and for FedDMMR on MovieLens-100K (configs/ml100k.yaml: 94 users a
round, 5 local epochs), the mean wall time of a round without evaluation, run through the
harness (payloads, the wire ledger, clients, sparse aggregation), against a plain loop of
centralised SASRec doing the same sequence updates: one model, one optimiser, the same
users' windows as the same minibatches, the same number of steps, the same negatives per
positive, no copies and no aggregation. FedAvg over SASRec trains that same network, so its
ratio is what the harness adds; FedDMMR's adds its experts, router and memory pass on top.
One process, one torch thread.

    python scripts/rec_round_benchmark.py [--rounds 6] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from baselines.rec.method import WindowScorer, banned_items, build_model, windows
from bench.data import load_dataset
from bench.features import FeatureStore
from bench.loader import load_config, method_config
from bench.runner import RunSpec, execute_run, method_env, sample_clients
from bench.runtime import LocalExecutor
from bench.training import make_optimizer, torch_generator


def harness_round(method: str, rounds: int, data_dir: str) -> float:
    cfg = load_config("ml100k", [f"data.root={data_dir}", f"training.rounds={rounds}", "eval.every=0", "runtime.torch_threads=1"])
    ds = load_dataset(cfg.data, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = execute_run(RunSpec(method, cfg), ds, FeatureStore(ds, cfg.backbone, Path(tmp)), LocalExecutor(cfg.runtime), tmp)
    walls = [r["wall_seconds"] for r in out.tables["rounds"] if r["acc_seen"] is None]
    return float(np.mean(walls[1:]))  # the first round pays one-time costs (the text features' load)


def plain_round(rounds: int, data_dir: str) -> float:
    torch.set_num_threads(1)
    cfg = load_config("ml100k", [f"data.root={data_dir}"])
    ds = load_dataset(cfg.data, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        env = method_env(cfg, ds, 0, tmp)
        mcfg = method_config(cfg, "fedavg_sasrec")
        model = build_model(mcfg, env)
        opt = make_optimizer(model.parameters(), env.train)
        users = ds.train_x[:, 0]
        times = []
        for r in range(rounds):
            t0 = time.perf_counter()
            for k in sample_clients(cfg, 0, r):
                seq = ds.train_y[users == k]
                win = torch.as_tensor(windows(seq, mcfg.max_seq_len))
                scorer = WindowScorer(model, mcfg, banned_items([seq], env.num_classes, "cpu"), None, None, k)
                one = torch.zeros(len(win), dtype=torch.int64)
                model.train()
                gen = torch_generator(r)
                for _ in range(cfg.training.local_epochs):
                    perm = torch.randperm(len(win), generator=gen)
                    loss = scorer.loss(win[perm], one)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            times.append(time.perf_counter() - t0)
    return float(np.mean(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--data-dir", default="../shared/data")
    args = ap.parse_args()
    plain = plain_round(args.rounds, args.data_dir)
    print(f"plain loop (centralised SASRec, the same sequence updates): {plain:.2f} s/round")
    for method in ("fedavg_sasrec", "feddmmr"):
        harness = harness_round(method, args.rounds, args.data_dir)
        print(f"{method} through the harness: {harness:.2f} s/round ({100 * (harness / plain - 1):+.0f}% over the plain loop)")


if __name__ == "__main__":
    main()
