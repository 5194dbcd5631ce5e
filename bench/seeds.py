"""Seeds derived from a run's seed: every random draw of a run comes from one of these, so a
rerun, another executor and another machine draw the same numbers."""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings via numpy's SeedSequence (stable everywhere)."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)
