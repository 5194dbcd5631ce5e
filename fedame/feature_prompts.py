"""Distribution prompts kept in the frozen backbone's feature space.

Why: the backbone is frozen, so a Gaussian of an old class's *backbone features* never goes
stale, while a Gaussian of *projected* features does as soon as the projector moves. With
prompts kept here the projector can keep learning: a replayed sample is drawn in feature
space and passed through the current projector, so it lands where that class's real
features would land today. The anchor-space prompt (anchor + residual bounded by the radius)
is still kept by `prompts.PromptBank` from the projected statistics; it is what the
distribution loss pulls real features towards.

Each prompt is mean + low-rank covariance: Sigma ~= L L^T + s^2 I with L of rank `rank`.
A diagonal covariance loses the correlations that separate classes in a 512-d feature space
(measured in docs/fedame.md); a full one costs d^2 per class on the wire.

Federation: for every class it holds (and only those), a client reports its count, feature
sum, the top `rank` scaled singular vectors of its centred features and the energy they
leave out. The
server merges the reports exactly up to that truncation (between-client mean shifts
included) and keeps one low-rank prompt per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedame.grouped import pad_runs, padded_slots, unpad_runs
from fedame.payload import FeaturePrompts, FeatureReport

REPORT_KEYS = ("count", "sum", "factor", "rest")  # a report's per-class parts, as the merge reads them


def client_report(x: torch.Tensor, y_pos: torch.Tensor, n_classes: int, rank: int) -> FeatureReport:
    """For each class the client holds (`pos`: positions among the `n_classes` seen ones;
    the others are not sent): count, sum, `rank` x d factor F with F^T F ~= centred scatter,
    and the energy F leaves out."""
    d = x.shape[1]
    x = x.detach().double()
    counts = torch.bincount(y_pos, minlength=n_classes).double()
    held = torch.nonzero(counts > 0).flatten()
    sums = torch.zeros(n_classes, d, dtype=torch.float64, device=x.device).index_add_(0, y_pos, x)[held]
    factors = torch.zeros(len(held), rank, d, dtype=torch.float64, device=x.device)
    rest = torch.zeros(len(held), dtype=torch.float64, device=x.device)
    for i, c in enumerate(held.tolist()):
        if counts[c] < 2:
            continue
        xc = x[y_pos == c]
        centred = xc - xc.mean(0)
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        k = min(rank, len(s))
        factors[i, :k] = s[:k, None] * vh[:k]
        rest[i] = (s[k:] ** 2).sum()
    return FeatureReport(
        held.cpu().numpy(), counts[held].cpu().numpy(), sums.cpu().numpy(), factors.float().cpu().numpy(), rest.cpu().numpy()
    )


def scatter_rows(pos: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """A client's per-class rows (at positions `pos`) as a dense n x ... array, zeros elsewhere
    (a class a client does not hold contributes nothing to a pooled statistic)."""
    dense = np.zeros((n, *rows.shape[1:]), dtype=rows.dtype)
    dense[pos] = rows
    return dense


def dense_report(report: FeatureReport, n: int) -> dict[str, np.ndarray]:
    """A client's report as dense per-class arrays over the `n` seen classes (`REPORT_KEYS`)."""
    return {k: scatter_rows(report.pos, getattr(report, k), n) for k in REPORT_KEYS}


def merge_class(
    counts: np.ndarray, sums: np.ndarray, factors: np.ndarray, rest: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """One class from K client reports: (mean, d x rank factor L, isotropic variance s^2)."""
    n = counts.sum()
    mean = sums.sum(0) / n
    local_means = sums / np.maximum(counts, 1)[:, None]
    shifts = np.sqrt(counts)[:, None] * (local_means - mean)  # between-client part of the scatter
    rows = np.concatenate([factors.reshape(-1, factors.shape[-1]).astype(np.float64), shifts])
    _, s, vh = np.linalg.svd(rows, full_matrices=False)
    k = min(rank, len(s))
    total = float((rows**2).sum() + rest.sum())
    dof = max(n - 1.0, 1.0)
    d = sums.shape[1]
    factor = np.zeros((d, rank))
    factor[:, :k] = (vh[:k].T * s[:k]) / np.sqrt(dof)
    iso = max(total - float((s[:k] ** 2).sum()), 0.0) / (dof * d)
    return mean, factor, iso


@dataclass
class FeaturePromptBank:
    rank: int
    mean: dict[int, np.ndarray] = field(default_factory=dict)
    factor: dict[int, np.ndarray] = field(default_factory=dict)
    iso: dict[int, float] = field(default_factory=dict)
    count: dict[int, float] = field(default_factory=dict)
    # the classes that had a prompt when this task began, and (once such a class comes back in
    # this task's reports) that prompt as one more client report
    carried: set[int] = field(default_factory=set)
    settled: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def settle(self) -> None:
        """Called as a task begins: each prompt so far counts as one more report for its class.

        Why: a class can come back in a later task with new data (a new domain of it, in a
        domain-incremental scenario). Its prompt then merges the new reports with what the
        earlier tasks saw (exact up to the rank truncation, as between clients) instead of
        being rebuilt from the new data alone. A prompt is copied into a report only when its
        class comes back, so in a class-incremental scenario nothing is copied or changed."""
        self.carried, self.settled = set(self.mean), {}

    def as_report(self, c: int) -> dict[str, np.ndarray]:
        """The prompt of `c` as a client report of its data: count, sum, a factor F with F^T F
        the scatter its low-rank part describes, and the scatter its isotropic rest holds."""
        n = self.count[c]
        dof = max(n - 1.0, 1.0)
        d = self.mean[c].shape[0]
        return {
            "count": np.float64(n),
            "sum": n * self.mean[c],
            "factor": np.sqrt(dof) * self.factor[c].T,
            "rest": np.float64(self.iso[c] * dof * d),
        }

    def update(self, classes: np.ndarray, reports: list[dict[str, np.ndarray]]) -> None:
        """Rebuild the prompts of `classes` (positions in the reports) from every client's report
        of this task, and the class's settled prompt from earlier tasks if it has one."""
        stack = {k: np.stack([r[k] for r in reports]) for k in REPORT_KEYS}
        for i, c in enumerate(classes):
            have = stack["count"][:, i] > 0
            if not have.any():
                continue
            parts = {k: v[have, i] for k, v in stack.items()}
            if int(c) in self.carried:
                if int(c) not in self.settled:  # before this task's first rebuild overwrites it
                    self.settled[int(c)] = self.as_report(int(c))
                parts = {k: np.concatenate([v, np.asarray(self.settled[int(c)][k], dtype=v.dtype)[None]]) for k, v in parts.items()}
            mean, factor, iso = merge_class(parts["count"], parts["sum"], parts["factor"], parts["rest"], self.rank)
            self.mean[int(c)], self.factor[int(c)], self.iso[int(c)] = mean, factor, iso
            self.count[int(c)] = float(parts["count"].sum())

    def prompts(self, classes: list[int], dim: int) -> FeaturePrompts:
        """The prompts of those of `classes` that have one, in their order."""
        have = [c for c in classes if c in self.mean]
        return FeaturePrompts(
            np.asarray(have, dtype=np.int64),
            np.stack([self.mean[c] for c in have]).astype(np.float32) if have else np.zeros((0, dim), np.float32),
            np.stack([self.factor[c] for c in have]).astype(np.float32) if have else np.zeros((0, dim, self.rank), np.float32),
            np.sqrt(np.asarray([self.iso[c] for c in have], dtype=np.float32)),
        )


def sample_features(mu: torch.Tensor, L: torch.Tensor, sd: torch.Tensor, which: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Draws backbone features from the prompts `which` (indices into mu / L / sd).

    The noise is drawn on the CPU generator, so every device draws the same samples."""
    z, e = draw_noise(len(which), L.shape[2], mu.shape[1], gen)
    return features_from_noise(mu, L, sd, which, z.to(mu.device), e.to(mu.device))


def draw_noise(m: int, rank: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard normal draws behind m samples: factor coordinates, then isotropic noise."""
    return torch.randn(m, rank, generator=gen), torch.randn(m, dim, generator=gen)


def features_from_noise(
    mu: torch.Tensor, L: torch.Tensor, sd: torch.Tensor, which: torch.Tensor, z: torch.Tensor, e: torch.Tensor
) -> torch.Tensor:
    """mu + L z + sd e for each row's prompt `which[i]`. The low-rank term is one batched
    product over the prompts drawn, each prompt's rows padded to the most drawn one, instead
    of gathering a d x rank factor per row (8 MB for 128 rows): the same dot products (at
    512 x 32 the same bits as the per-row product in every case measured; small shapes can
    round apart in the last bit), ten times faster for an epoch's draws."""
    order = torch.argsort(which, stable=True)
    slot, longest = padded_slots(torch.bincount(which, minlength=len(L)))
    lz = unpad_runs(torch.bmm(pad_runs(z[order], slot, len(L), longest), L.transpose(1, 2)), slot)
    return mu[which] + torch.empty_like(lz).index_copy_(0, order, lz) + sd[which, None] * e
