"""Class scores from the distribution prompts' own statistics: a shrunk Mahalanobis distance.

Why: a feature-space prompt is a Gaussian of a class's frozen backbone features (mean + L L^T
+ s^2 I). Those statistics are exact summaries of every client's data that never go stale, so
the distance of a test feature to each prompt is a classifier that cannot forget and does not
depend on routing. FedAME adds it to the anchor logits (`gaussian_weight`).

The covariance is shrunk and normalised as FeCAM does it (baselines/fecam.py):
C + g1 mean(diag C) I + g2 mean(offdiag C) (11^T - I), then divided by sqrt(diag) on both
sides. A rank-r prompt keeps that matrix "diagonal + rank r+1", so the distance is computed
through the Woodbury identity in O(d r) per sample and class instead of forming d x d
precisions (100 classes of 512-d would be 100 MB and 26 GFLOP per 10,000 test samples).
"""

from __future__ import annotations

import torch


def shrunk_factors(L: torch.Tensor, sd: torch.Tensor, shrink: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class, the shrunk covariance C' = a I + U diag(sign) U^T and its diagonal's sqrt.

    L: (k, d, r) factors, sd: (k,) isotropic std. Returns (scale (k, d), a (k,), U (k, d, r+1),
    sign (k, r+1)); float64 for a stable solve."""
    L, iso = L.double(), sd.double() ** 2
    k, d, r = L.shape
    diag = (L**2).sum(-1) + iso[:, None]  # diag of L L^T + s^2 I
    mean_diag = diag.mean(1)
    mean_off = ((L.sum(1) ** 2).sum(-1) + iso * d - diag.sum(1)) / (d * (d - 1))  # (1^T C 1 - tr C) / (d(d-1))
    a = iso + shrink * (mean_diag - mean_off)
    ones = torch.ones(k, d, 1, dtype=L.dtype, device=L.device)
    U = torch.cat([L, ones * (shrink * mean_off.abs()).sqrt()[:, None, None]], dim=2)
    sign = torch.ones(k, r + 1, dtype=L.dtype, device=L.device)
    sign[:, r] = torch.where(mean_off < 0, -1.0, 1.0)
    scale = (diag + shrink * mean_diag[:, None]).sqrt()  # the off-diagonal term leaves the diagonal alone
    return scale, a, U, sign


def mahalanobis(x: torch.Tensor, mu: torch.Tensor, L: torch.Tensor, sd: torch.Tensor, shrink: float, chunk: int = 25) -> torch.Tensor:
    """(n, k) squared distances of x (n, d) to k prompts under their shrunk, normalised covariance.

    Normalised: N = D^-1 C' D^-1 with D = diag(scale), so diff^T N^-1 diff = v^T C'^-1 v with
    v = D diff, and C'^-1 = (I - U (a S^-1 + U^T U)^-1 U^T) / a (Woodbury). Computed for
    `chunk` classes at a time as matrix products over all samples (float64)."""
    scale, a, U, sign = shrunk_factors(L, sd, shrink)
    x, mu = x.double(), mu.double()
    s2 = scale**2
    inner_inv = torch.linalg.inv(torch.diag_embed(a[:, None] / sign) + U.transpose(1, 2) @ U)  # (k, r+1, r+1)
    out = torch.empty(len(x), len(mu), dtype=torch.float64, device=x.device)
    for c in range(0, len(mu), chunk):
        sl = slice(c, c + chunk)
        # |v|^2 = sum_d s^2 (x - mu)^2, expanded into products over all samples at once
        vv = (x * x) @ s2[sl].T - 2 * x @ (mu[sl] * s2[sl]).T + (mu[sl] ** 2 * s2[sl]).sum(1)
        W = scale[sl, :, None] * U[sl]  # p = U^T v = W^T x - W^T mu
        p = torch.einsum("nd,kdr->nkr", x, W) - torch.einsum("kd,kdr->kr", mu[sl], W)
        quad = torch.einsum("nkr,krs,nks->nk", p, inner_inv[sl], p)
        out[:, sl] = (vv - quad) / a[sl]
    return out
