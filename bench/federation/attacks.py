"""Malicious clients: a seeded choice of clients per run and what they do to their update.

An attack touches the update's *parameters*: the arrays it shares, by name, shape and float
dtype, with the payload the client received (the global model it started from, g). With u
the honest update:

* random: g + noise * rms(g) * N(0, 1) (seeded per client and round), the honest work thrown away;
* sign_flip: g - factor * (u - g), the client's change reversed (and amplified, as the
  literature's sign-flipping attack does; factor 1 is a plain reversal);
* scale: g + factor * (u - g), the client's change blown up;
* free_rider: g, nothing learnt, its sample count still claimed;
* label_flip: the client trains honestly on flipped labels (its classes in reverse order),
  so its statistics are poisoned too.

Arrays that are not parameters (class statistics, feature reports) are left as computed:
only label flipping reaches methods that send nothing else (those that only report class statistics).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bench.api import ClientData, ClientUpdate, Message, derive_seed
from bench.config import AttackConfig, ConfigError


def malicious_clients(attack: AttackConfig, num_clients: int, run_seed: int) -> tuple[int, ...]:
    """The run's malicious clients (sorted), a seeded choice fixed for the whole run."""
    if attack.kind == "none":
        return ()
    count = attack.clients if attack.fraction is None else max(1, int(round(attack.fraction * num_clients)))
    if count < 1 or count > num_clients:
        raise ConfigError(
            f"scenario.attack: {count} malicious clients of {num_clients}; set scenario.attack.clients "
            f"(1..{num_clients}) or scenario.attack.fraction"
        )
    rng = np.random.default_rng(derive_seed(run_seed, "attack", "clients"))
    return tuple(sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False)))


def flip_labels(data: ClientData) -> ClientData:
    """The client's classes mapped to the same classes in reverse order."""
    y = np.asarray(data.y)
    classes = np.unique(y)
    flipped = classes[::-1][np.searchsorted(classes, y)]
    return dataclasses.replace(data, y=flipped)


def attack_update(attack: AttackConfig, payload: Message, update: ClientUpdate, seed: int) -> ClientUpdate:
    if attack.kind in ("none", "label_flip"):
        return update
    rng = np.random.default_rng(derive_seed(seed, "attack", attack.kind))
    arrays = dict(update.arrays)
    for k in sorted(arrays):
        u, g = arrays[k], payload.arrays.get(k)
        if g is None or np.shape(g) != np.shape(u) or not np.issubdtype(np.asarray(u).dtype, np.floating):
            continue
        g = np.asarray(g, dtype=np.float64)
        delta = np.asarray(u, dtype=np.float64) - g
        if attack.kind == "random":
            rms = float(np.sqrt(np.mean(g * g))) or 1.0
            new = g + attack.noise * rms * rng.standard_normal(g.shape)
        elif attack.kind == "sign_flip":
            new = g - attack.factor * delta
        elif attack.kind == "scale":
            new = g + attack.factor * delta
        else:  # free_rider
            new = g
        arrays[k] = new.astype(np.asarray(u).dtype)
    return dataclasses.replace(update, arrays=arrays)
