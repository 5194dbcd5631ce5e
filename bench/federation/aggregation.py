"""Aggregation rules over one parameter group (a model, a head, one expert).

Each rule returns the combined arrays and the share of the result each update had, so a
reader can see whom the server trusted:

* mean: the sample-weighted mean (`bench.federation.mean.weighted_average`); share = its weight.
* median: coordinate-wise median; share = the fraction of coordinates where the update's
  value is the median (half each for the two middle values of an even count).
* trimmed_mean: per coordinate, the `trim` fraction of largest and of smallest values is cut
  and the rest averaged; share = the fraction of kept values that were the update's.
* krum / multi_krum (Blanchard et al., 2017): each update is scored by the summed squared
  distances to its n - f - 2 nearest others (f = `byzantine`); Krum keeps the best one,
  Multi-Krum the `keep` best (default n - f), sample-weighted. They need n >= 2f + 3 updates;
  with fewer (an expert held by two clients) the coordinate-wise median is used instead and
  counted as a fallback.
* attention: updates are tokens. Each is embedded by a seeded random projection (a count
  sketch) of its change from the global model (of its parameters when no global model is
  given); an update's score is its mean cosine similarity to the others, and the weights are
  softmax(score / temperature) times sample counts. An update that disagrees with the rest
  gets a small weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bench.api import ClientUpdate, Combined
from bench.config import AggregationConfig
from bench.federation.mean import weighted_average
from bench.seeds import derive_seed


@dataclass(frozen=True)
class RuleAggregator:
    """The run's rule as the method contract's `Aggregator`: what the runner injects into
    MethodEnv, so methods combine through `Server.combine` without importing the rules."""

    rule: AggregationConfig
    seed: int  # the run's aggregation seed (the attention rule's sketch)

    def __call__(
        self, updates: list[ClientUpdate], keys: list[str], weights: list[float] | None, reference: dict[str, np.ndarray] | None
    ) -> Combined:
        return combine(self.rule, updates, keys, weights, reference, seed=self.seed)


def mean_aggregator(seed: int = 0) -> RuleAggregator:
    """The default rule (the sample-weighted mean), for a MethodEnv built outside a run."""
    return RuleAggregator(AggregationConfig(), seed)


def combine(
    rule: AggregationConfig,
    updates: list[ClientUpdate],
    keys: list[str],
    weights: list[float] | None = None,
    reference: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> Combined:
    """`updates` must all carry `keys` (the group); `weights` default to sample counts."""
    keys = sorted(keys)
    w = np.array([float(u.num_samples) for u in updates] if weights is None else weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(updates), 1.0 / len(updates))
    if rule.rule == "mean" or not keys:
        return Combined(weighted_average(updates, keys, weights=weights), w)
    V = np.stack([np.concatenate([np.asarray(u.arrays[k], dtype=np.float64).ravel() for k in keys]) for u in updates])
    n = len(updates)
    fallback = False
    if rule.rule in ("krum", "multi_krum") and n < 2 * rule.byzantine + 3:
        rule, fallback = rule.model_copy(update={"rule": "median"}), True
    if rule.rule == "median":
        flat, shares = _median(V)
    elif rule.rule == "trimmed_mean":
        flat, shares = _trimmed_mean(V, rule.trim)
    elif rule.rule in ("krum", "multi_krum"):
        keep = 1 if rule.rule == "krum" else min(n, rule.keep or n - rule.byzantine)
        chosen = np.argsort(_krum_scores(V, rule.byzantine), kind="stable")[:keep]
        shares = np.zeros(n)
        shares[chosen] = w[chosen] / w[chosen].sum() if w[chosen].sum() > 0 else 1.0 / keep
        flat = shares @ V
    else:  # attention
        ref = None
        if reference is not None and all(k in reference for k in keys):
            ref = np.concatenate([np.asarray(reference[k], dtype=np.float64).ravel() for k in keys])
        shares = _attention(V if ref is None else V - ref, w, rule, seed)
        flat = shares @ V
    return Combined(_unflatten(flat, keys, updates[0].arrays), shares, fallback)


def _unflatten(flat: np.ndarray, keys: list[str], like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, a = {}, 0
    for k in keys:
        shape, dtype = np.shape(like[k]), np.asarray(like[k]).dtype
        size = int(np.prod(shape))
        out[k] = flat[a : a + size].reshape(shape).astype(dtype)
        a += size
    return out


def _median(V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(V)
    order = np.argsort(V, axis=0, kind="stable")
    middle = order[n // 2 : n // 2 + 1] if n % 2 else order[n // 2 - 1 : n // 2 + 1]  # the one or two middle values
    shares = np.bincount(middle.ravel(), minlength=n) / middle.size
    return np.take_along_axis(V, middle, axis=0).mean(0), shares


def _trimmed_mean(V: np.ndarray, trim: float) -> tuple[np.ndarray, np.ndarray]:
    n = len(V)
    cut = int(np.floor(trim * n))  # trim < 0.5 leaves at least one value
    order = np.argsort(V, axis=0, kind="stable")
    kept = order[cut : n - cut]
    shares = np.bincount(kept.ravel(), minlength=n) / kept.size
    return np.take_along_axis(V, kept, axis=0).mean(0), shares


def _krum_scores(V: np.ndarray, f: int) -> np.ndarray:
    sq = (V * V).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * V @ V.T, 0.0)
    np.fill_diagonal(d, np.inf)
    m = len(V) - f - 2
    return np.sort(d, axis=1)[:, :m].sum(1)


@lru_cache(maxsize=32)
def _sketch(size: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(derive_seed(seed, "attention-sketch", size, dim))
    return rng.integers(0, dim, size), rng.choice(np.array([-1.0, 1.0]), size)


def count_sketch(X: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Each row of X embedded in `dim` dimensions by a seeded count sketch (a random
    projection that needs no dense matrix), scaled to unit length."""
    bucket, sign = _sketch(X.shape[1], dim, seed)
    E = np.stack([np.bincount(bucket, weights=sign * x, minlength=dim) for x in X])
    return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)


def _attention(D: np.ndarray, w: np.ndarray, rule: AggregationConfig, seed: int) -> np.ndarray:
    n = len(D)
    if n == 1:
        return np.ones(1)
    E = count_sketch(D, rule.sketch_dim, seed)
    S = E @ E.T
    score = (S.sum(1) - np.diag(S)) / (n - 1)
    logits = score / rule.temperature + np.log(np.maximum(w, 1e-300))
    p = np.exp(logits - logits.max())
    return p / p.sum()
