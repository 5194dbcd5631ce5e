"""What crosses the object store: payload arrays put once each (small ones inline), and the
driver's light views of payloads and updates that live there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.api import Message

INLINE_BYTES = 64 * 1024  # arrays up to this size travel inside the call, not through the object store


def put_once(messages: list[Message]) -> list[dict[str, Any]]:
    """For each message, name -> an object-store reference, or the array itself when it is
    small (a ray.put costs about as much as a whole actor call, and a small head's rounds
    are made of little else). An array shared by several messages is put once. The caller
    keeps `messages` alive, so no id() can be reused."""
    import ray

    by_id: dict[int, Any] = {}
    out = []
    for msg in messages:
        refs = {}
        for name, arr in msg.arrays.items():
            if id(arr) not in by_id:
                by_id[id(arr)] = arr if arr.nbytes <= INLINE_BYTES else ray.put(arr)
            refs[name] = by_id[id(arr)]
        out.append(refs)
    return out


@dataclass
class RemotePayload:
    """A payload that already lives in the object store: array name -> reference."""

    refs: dict[str, Any]
    meta: dict[str, Any]
    nbytes: int
    manifest: Any  # bench.wire.Manifest: what the runner's wire ledger charges


@dataclass
class RemoteUpdate:
    """What the driver holds of a client update: its reference and the numbers the rounds
    table needs. The arrays stay in the object store until the central actor reads them."""

    ref: Any
    nbytes: int
    num_samples: int
    loss: float
