"""Rows in runs, one run per group, laid out padded to the longest run.

Why: each group's rows are few (an expert's share of a minibatch, a prompt's draws), so one
small product per group costs its per-operation overhead many times over; one batched
product over every group's run padded to the same length is faster (docs/fedame.md, cost).
The padding rows are zeros and are never read back.
"""

from __future__ import annotations

import torch


def padded_slots(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For rows made of consecutive runs (`counts[j]` rows for group j, in group order):
    each row's slot in a (len(counts) x longest) layout, and the longest run."""
    longest = int(counts.max()) if len(counts) else 0
    run = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    return run * longest + torch.arange(len(run), device=counts.device) - starts[run], longest


def pad_runs(x: torch.Tensor, slot: torch.Tensor, groups: int, longest: int) -> torch.Tensor:
    """(groups, longest, ...) with each group's run of rows of `x` at the front, zeros after."""
    rest = x.shape[1:]
    return x.new_zeros(groups * longest, *rest).index_copy(0, slot, x).view(groups, longest, *rest)


def unpad_runs(y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The rows of a padded (groups, longest, ...) tensor back in run order."""
    return y.reshape(-1, *y.shape[2:]).index_select(0, slot)
