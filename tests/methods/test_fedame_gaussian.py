"""FedAME's prompt Gaussian scores: the low-rank (Woodbury) distance equals FeCAM's dense
shrunk, normalised Mahalanobis distance on the same covariance."""

import numpy as np
import pytest
import torch

from baselines.fecam import FeCAMConfig, shrunk_precision
from fedame.gaussian import mahalanobis


@pytest.mark.parametrize("shrink", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("offset", [2.0, -2.0])  # positive and negative mean covariance off the diagonal
def test_low_rank_distance_equals_the_dense_fecam_distance(shrink, offset):
    g = torch.Generator().manual_seed(0)
    k, d, r = 3, 20, 4
    L = torch.randn(k, d, r, generator=g, dtype=torch.float64)
    L[:, :, 0] += offset / np.sqrt(d)  # a shared direction sets the off-diagonal mean's sign
    sd = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    mu = torch.randn(k, d, generator=g, dtype=torch.float64)
    x = torch.randn(7, d, generator=g, dtype=torch.float64) * 3
    got = mahalanobis(x, mu, L, sd, shrink).numpy()
    cfg = FeCAMConfig(shrink_diag=shrink, shrink_offdiag=shrink, tukey_beta=None)
    for c in range(k):
        cov = (L[c] @ L[c].T).numpy() + float(sd[c]) ** 2 * np.eye(d)
        diff = (x - mu[c]).numpy()
        np.testing.assert_allclose(got[:, c], ((diff @ shrunk_precision(cov, cfg)) * diff).sum(1), rtol=1e-8)


def test_class_chunks_do_not_change_the_distances():
    g = torch.Generator().manual_seed(1)
    k, d, r = 7, 12, 3
    L, sd = torch.randn(k, d, r, generator=g, dtype=torch.float64), torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    mu, x = torch.randn(k, d, generator=g, dtype=torch.float64), torch.randn(5, d, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(mahalanobis(x, mu, L, sd, 1.0, chunk=2).numpy(), mahalanobis(x, mu, L, sd, 1.0).numpy(), rtol=1e-12)
