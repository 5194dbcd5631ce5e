"""Shared pieces of local training: optimiser, seeded minibatches, the epoch loop, and
conversion between torch modules and the numpy dicts that travel in messages.

Methods do not copy the training loop; they hand `train_epochs` a loss function built
from loss terms (CE plus whatever their method adds), as Avalanche plugins hook one loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.api import TrainContext, TrainSettings
from bench.errors import Diverged

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_optimizer(params: Iterable[torch.nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, foreach=True)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, foreach=True)


def warm_up() -> None:
    """Pay torch's one-time costs of a first training step (the first optimiser imports
    torch._dynamo lazily) before any run's clock starts. Otherwise the first run of a
    process, whichever method it is, is charged a second or so that the runs after it are
    not (docs/results.md, cost section)."""
    w = torch.zeros(2, requires_grad=True)
    for opt in (torch.optim.SGD([w], lr=0.1, foreach=True), torch.optim.Adam([w], fused=True)):
        (w * w).sum().backward()
        opt.step()


def as_tensor(a: np.ndarray | torch.Tensor, device: str | torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`a` as a tensor on `device`; no copy when it already is one there (client data an
    actor keeps on its GPU between rounds) or, on the CPU, when it is a numpy array."""
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def torch_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def minibatches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    for a in range(0, n, batch_size):
        yield perm[a : a + batch_size]


def train_epochs(
    params: Iterable[torch.nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    ctx: TrainContext,
    loss_fn: LossFn,
    gen: torch.Generator,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[], object] | None = None,
    after_epoch: Callable[[int], object] | None = None,
) -> float:
    """The one training loop: `local_epochs` passes of seeded minibatches; mean loss.

    The minibatch order comes from a CPU generator, so it is the same on every device; the
    loss is summed on the device (no host sync per step) and read once at the end. Hooks:
    `optimizer` instead of the one `ctx.train` describes (a method's own, say AdamW),
    `after_step` after each optimiser step (a learning-rate schedule, a progress bar),
    `after_epoch(epoch)` after each pass (an evaluation)."""
    opt = optimizer if optimizer is not None else make_optimizer(params, ctx.train)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    count = 0
    on_cpu = x.device.type == "cpu"
    for epoch in range(ctx.train.local_epochs):
        for idx in minibatches(len(x), ctx.train.batch_size, gen):
            if not on_cpu:
                idx = idx.to(x.device, non_blocking=True)
            loss = loss_fn(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total.add_(loss.detach(), alpha=len(idx))  # the exact product in float64, one rounding
            count += len(idx)
        if after_epoch is not None:
            after_epoch(epoch)
    return finite_loss(float(total) / max(count, 1), ctx)


def finite_loss(loss: float, ctx: TrainContext) -> float:
    """`loss`, or `Diverged` when it is not a number (NaN or infinite)."""
    if not np.isfinite(loss):
        raise Diverged(
            f"training diverged: client {ctx.client_id}'s mean loss is {loss} in task {ctx.task}, round {ctx.round}; "
            "lower training.lr or the method's loss weights"
        )
    return loss


def tensor_arrays(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, np.ndarray]:
    """Named tensors as numpy arrays under `prefix` (copies, safe to send)."""
    return {prefix + k: v.detach().cpu().numpy().copy() for k, v in tensors.items()}


def module_arrays(module: nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """A module's state as float32 numpy arrays (copies, safe to send)."""
    return tensor_arrays(module.state_dict(), prefix)


def load_module_arrays(module: nn.Module, arrays: dict[str, np.ndarray], prefix: str = "", assign: bool = False) -> None:
    """Copy the arrays at `prefix` into `module` (`assign`: make copies of them its tensors)."""
    state = {k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix)}
    module.load_state_dict(state, assign=assign)


def module_from_arrays(
    build: Callable[[], nn.Module], arrays: dict[str, np.ndarray], prefix: str = "", device: str | torch.device = "cpu"
) -> nn.Module:
    """`build()`'s module holding (copies of) the arrays at `prefix`, on `device`. Built on the
    meta device, so its random initialisation, overwritten anyway, is never computed: a
    client that rebuilds a model from every payload spent more on initialising it than on
    loading it."""
    with torch.device("meta"):
        module = build()
    load_module_arrays(module, arrays, prefix, assign=True)
    return module.to(device)


def class_mask(seen: torch.Tensor, num_classes: int, device: str | torch.device) -> torch.Tensor:
    """0 for the classes seen, -inf for the others: added to logits (build it once per
    local_train, not per minibatch)."""
    mask = torch.full((num_classes,), float("-inf"), device=device)
    mask[seen] = 0.0
    return mask


def masked_logits(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Logits with every class not yet seen pushed to -inf (class-incremental prediction)."""
    return logits + class_mask(seen, logits.shape[-1], logits.device)


@torch.no_grad()
def batched_argmax(model: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    out = [model(torch.from_numpy(np.asarray(x[a : a + chunk], dtype=np.float32))).argmax(1) for a in range(0, len(x), chunk)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD: KL(teacher_T || student_T) · T²."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


# ------------------------------------------------------------------ batched clients

ParamLossFn = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]  # (params, x, y) -> loss


def train_epochs_batched(
    start: dict[str, torch.Tensor],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    ctxs: list[TrainContext],
    loss_fn: ParamLossFn,
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """`train_epochs` for many clients at once: every client starts from the parameters
    `start`, trains on its own data with its own minibatch order (its own seeded generator,
    as in `train_epochs`) and its own optimiser state, and all of them take each step
    together, as one stacked computation (torch.func.vmap over clients).

    Parameters are stacked along a new first axis (one row per client) and updated by one
    optimiser of the configured kind: SGD and Adam act elementwise, so each row follows
    exactly its own client's trajectory. At step s the clients that still have a minibatch
    are grouped by its size (a last minibatch may be smaller) and each group is one vmap
    call; a client whose last step is done is copied out then, so the steps the others
    still take cannot move it. The same arithmetic as the per-client loop, summed in
    another order: results agree to float rounding (tests/training/test_batched.py states the
    tolerance). Returns each client's final parameters and mean loss."""
    from torch.func import vmap

    n = len(data)
    stacked = {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.dim())).requires_grad_() for k, v in start.items()}
    opt = make_optimizer(stacked.values(), ctxs[0].train)
    schedules = []
    for (x, _), ctx in zip(data, ctxs):
        gen = torch_generator(ctx.seed)
        schedules.append([idx for _ in range(ctx.train.local_epochs) for idx in minibatches(len(x), ctx.train.batch_size, gen)])
    steps = max((len(s) for s in schedules), default=0)
    device = next(iter(start.values())).device
    totals = torch.zeros(n, dtype=torch.float64, device=device)  # beside the losses (a GPU's, when training there)
    final: list[dict[str, torch.Tensor] | None] = [None] * n
    per_client = vmap(loss_fn)
    for s in range(steps):
        groups: dict[int, list[int]] = {}
        for k, sched in enumerate(schedules):
            if s < len(sched):
                groups.setdefault(len(sched[s]), []).append(k)
        opt.zero_grad(set_to_none=True)
        for rows in groups.values():
            idx = torch.tensor(rows, device=device)
            xb = torch.stack([data[k][0][schedules[k][s]] for k in rows])
            yb = torch.stack([data[k][1][schedules[k][s]] for k in rows])
            losses = per_client({name: p[idx] for name, p in stacked.items()}, xb, yb)
            losses.sum().backward()  # rows are separate parameters: each gets its own gradient
            totals[idx] += losses.detach().double() * xb.shape[1]
        opt.step()
        for k, sched in enumerate(schedules):
            if s == len(sched) - 1:  # its last step: keep it before the others' steps move its row
                final[k] = {name: p[k].detach().clone() for name, p in stacked.items()}
    for k in range(n):
        if final[k] is None:  # no data: the start, untouched
            final[k] = {name: v.detach().clone() for name, v in start.items()}
    counts = [sum(len(i) for i in sched) for sched in schedules]
    return final, [finite_loss(float(totals[k]) / max(counts[k], 1), ctx) for k, ctx in enumerate(ctxs)]
