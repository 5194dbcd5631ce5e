"""Profile one FedAME client update on the main job (docs/fedame.md, "Cost (issue #12)").

Runs `fedame-bench run` with the given config and options until the N-th client update
(default 76: task 3, round 0, client 0 of the main job's 5 clients x 5 rounds), keeps that
update's payload, data and context, stops the run, then replays the update on its own:
its best time over repeats (as a first round of the task, and as a later round, which reuses
the teacher's logits), the top operations of `torch.profiler` and what the profiled self
time is made of (matrix products, the optimiser's step, the rest), and the time with the
experts' dispatch removed (the mixture replaced by the projected feature), an upper bound of
what batching the experts could save.

    python scripts/profile_fedame_step.py -- -c configs/cifar100_local.yaml --alpha 0.5 --seeds 0
    python scripts/profile_fedame_step.py --job 26 -- -c configs/cifar100_local.yaml --set methods.fedame.router_map=true

Run it alone on the machine: its times are meant to be compared with each other. The
stopped run is reported as failed; its tables go to a temporary directory, removed after.
The once-per-task feature report (an SVD per class held) is left out of the replay.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import torch.nn.functional as F


class _Captured(Exception):
    """Raised inside the run once the wanted client update has been recorded."""


def capture(job: int, run_args: list[str]) -> tuple:
    from bench.cli import app
    from fedame.method import FedAMEClient

    original, seen, kept = FedAMEClient.local_train, [0], []

    def recording(self, payload, data, ctx):
        seen[0] += 1
        if seen[0] == job:
            kept.append((self, payload, data, ctx))
            raise _Captured
        return original(self, payload, data, ctx)

    FedAMEClient.local_train = recording
    try:
        with tempfile.TemporaryDirectory() as out:
            app(["run", "--methods", "fedame", "--out", out, *run_args], standalone_mode=False)
    except _Captured:
        pass
    finally:
        FedAMEClient.local_train = original
    if not kept:
        sys.exit(f"the run made only {seen[0]} client updates; choose --job <= {seen[0]}")
    return kept[0]


def best_time(client, payload, data, ctx, repeats: int, first_round: bool = False) -> float:
    """Best time of `repeats` calls; `first_round`: with the teacher-logit memo emptied before
    each, as in a client's first round of a task (later rounds reuse the logits)."""
    client.local_train(payload, data, ctx)  # first call pays one-time imports
    times = []
    for _ in range(repeats):
        if first_round:
            client._teacher_memo.clear()
        t0 = time.perf_counter()
        client.local_train(payload, data, ctx)
        times.append(time.perf_counter() - t0)
    return min(times)


# the dense matrix products, and the optimiser's step, by their profiler names
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv", "aten::dot"}
OPTIMISER = ("aten::_fused_adam_", "aten::_foreach_")


def time_shares(averages) -> str:
    """What the profiled self time is made of: matrix products, the optimiser's step, and the
    rest (elementwise passes, gathers and scatter-adds, copies, fills, reductions)."""
    total = sum(e.self_cpu_time_total for e in averages)
    products = sum(e.self_cpu_time_total for e in averages if e.key in PRODUCTS)
    optimiser = sum(e.self_cpu_time_total for e in averages if e.key.startswith(OPTIMISER))
    ops = sum(e.count for e in averages if e.key.startswith("aten::"))
    return (
        f"self time: matrix products {products / total:.0%}, optimiser step {optimiser / total:.0%}, "
        f"the rest (elementwise, gathers, scatters, copies) {(total - products - optimiser) / total:.0%}; "
        f"{ops} aten calls (nested ones included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=int, default=76, help="which client update (1-based, in run order)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=15, help="rows of the profiler table")
    parser.add_argument("run_args", nargs="*", help="options for `fedame-bench run` (after --)")
    args = parser.parse_args()
    client, payload, data, ctx = capture(args.job, args.run_args)
    payload.arrays["want_feature_stats"] = np.array(False)  # the once-per-task report is timed apart
    a = payload.arrays
    print(
        f"client update {args.job}: task {ctx.task}, round {ctx.round}, client {ctx.client_id}: "
        f"{len(data.y)} samples, {len(a['held'])} experts held, {len(a['seen'])} classes seen, "
        f"minibatch {client.config.batch_size or ctx.train.batch_size}"
    )
    first = best_time(client, payload, data, ctx, args.repeats, first_round=True)
    full = best_time(client, payload, data, ctx, args.repeats)
    print(
        f"local_train: {first * 1000:.0f} ms in the client's first round of the task, "
        f"{full * 1000:.0f} ms in a later one (teacher's logits memoised; best of {args.repeats} each)"
    )
    from torch.profiler import profile

    with profile() as prof:
        client.local_train(payload, data, ctx)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(time_shares(averages))
    import fedame.model as method  # where the mixture calls mix

    mix = method.mix
    method.mix = lambda experts, positions, u, top, gates: F.normalize(u * gates.sum(1, keepdim=True), dim=-1)
    try:
        bare = best_time(client, payload, data, ctx, args.repeats)
    finally:
        method.mix = mix
    print(f"without the experts' dispatch: {bare * 1000:.0f} ms ({bare / full:.0%} of the update)")


if __name__ == "__main__":
    main()
