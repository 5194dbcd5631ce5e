"""What a payload costs on the wire when a client keeps what it was sent.

Why: a payload is rebuilt from the server's state every round, but much of it has not
changed since the client last received it: a frozen projector, the previous task's model
(identical to the current model at the start of a task), anchors, the prompts of classes
whose statistics are final. A deployment sends those once and then refers to them; counting
them every round would charge a method for an artefact of how the harness builds messages.

The model (the same for every method, counted by the runner, so no method can count in its
own favour): a client holds the content of the last payload it received. Content is
addressed in chunks: a whole array, and for arrays of two or more dimensions also each slice
along the first axis (one class's prompt, one row of a weight matrix). A chunk the client
holds costs a reference of `REF_BYTES`; anything else costs its bytes. Arrays smaller than
`MIN_CHUNK_BYTES` are always sent in full. Updates (bytes up) are counted in full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

REF_BYTES = 16  # a 128-bit content digest
MIN_CHUNK_BYTES = 1024

Chunk = tuple[bytes, int]  # (digest, bytes)


class ArrayManifest(NamedTuple):
    """One array's chunks: the whole array, and its first-axis slices (empty for small or 1-d
    arrays) with the set of their digests (what a client holds after receiving them)."""

    whole: Chunk | None
    rows: tuple[Chunk, ...]
    row_digests: frozenset[bytes]
    nbytes: int


Manifest = list[ArrayManifest]

# whole-array digest -> its rows' chunks. Content-addressed, so valid across rounds, clients
# and runs: an array sent before (a frozen projector, an old class's prompt, anchors) is
# hashed once in full, not again slice by slice. Bounded: cleared when it holds this many.
_ROWS_CACHE: dict[bytes, tuple[tuple[Chunk, ...], frozenset[bytes]]] = {}
_ROWS_CACHE_MAX = 4096


def _digest(header: bytes, buf: np.ndarray) -> bytes:
    h = hashlib.blake2b(header, digest_size=REF_BYTES)
    h.update(buf)  # a contiguous array: read in place through the buffer protocol
    return h.digest()


def array_manifest(a: np.ndarray) -> ArrayManifest:
    if a.nbytes < MIN_CHUNK_BYTES:
        return ArrayManifest(None, (), frozenset(), int(a.nbytes))
    c = np.ascontiguousarray(a)
    whole = (_digest(f"{c.dtype.str}{c.shape}".encode(), c), int(c.nbytes))
    cached = _ROWS_CACHE.get(whole[0])
    if cached is None:
        rows: tuple[Chunk, ...] = ()
        if c.ndim >= 2 and c.shape[0] > 1:
            header = f"{c.dtype.str}{c.shape[1:]}".encode()
            rows = tuple((_digest(header, r), int(r.nbytes)) for r in c)
        if len(_ROWS_CACHE) >= _ROWS_CACHE_MAX:
            _ROWS_CACHE.clear()
        cached = _ROWS_CACHE[whole[0]] = (rows, frozenset(d for d, _ in rows))
    return ArrayManifest(whole, *cached, int(c.nbytes))


def manifests(arrays_per_message: Iterable[dict[str, np.ndarray]]) -> list[Manifest]:
    """The manifest of each message; an array object shared by several messages (the
    round's common part) is hashed once."""
    memo: dict[int, ArrayManifest] = {}
    keep: list[np.ndarray] = []  # hold the arrays so an id is not reused while memoised
    out = []
    for arrays in arrays_per_message:
        m = []
        for a in arrays.values():
            if id(a) not in memo:
                memo[id(a)] = array_manifest(a)
                keep.append(a)
            m.append(memo[id(a)])
        out.append(m)
    return out


class WireLedger:
    """Per client, the chunks it holds (those of its last payload); charges a payload what
    it costs to send given them."""

    def __init__(self) -> None:
        self._held: dict[int, set[bytes]] = {}

    def charge(self, client_id: int, manifest: Manifest) -> int:
        """Bytes to send `manifest` to the client: a held chunk (held before, or sent earlier
        in this payload) costs a reference, anything else its bytes. Rows are counted with
        set operations: the rows of one array have one size, so an array not held whole
        costs a reference per row plus, for each distinct row not held, its bytes less a
        reference (a row repeated within the array is sent once)."""
        held = self._held.get(client_id, set())
        now: set[bytes] = set()
        cost = 0
        for whole, rows, row_digests, nbytes in manifest:
            if whole is None:
                cost += nbytes
                continue
            if whole[0] in held or whole[0] in now:
                cost += REF_BYTES
            elif rows:
                new = row_digests - held - now
                cost += len(rows) * REF_BYTES + len(new) * (rows[0][1] - REF_BYTES)
            else:
                cost += nbytes
            now.add(whole[0])
            now |= row_digests
        self._held[client_id] = now
        return cost
