"""Item features the memory experts read: text (MiniLM embeddings of each item's title,
year and genres, computed once and cached) and visual (a file the user supplies; ML-100K
has no images, and nothing random stands in for them)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from bench.errors import UserError
from bench.hf import minilm_dir, sentence_embeddings
from bench.inputs import atomic_write

_MEMO: dict[str, np.ndarray] = {}


class FeatureFileError(UserError):
    pass


def padded_rows(x: np.ndarray) -> np.ndarray:
    """Features with a zero row 0 in front (the networks' padding id)."""
    return np.concatenate([np.zeros((1, x.shape[1]), np.float32), x.astype(np.float32)])


def text_features(item_texts: tuple[str, ...], cache_dir: str, model_dir: str | None) -> np.ndarray:
    """(items + 1) x 384: row i + 1 embeds item i's text, row 0 is zeros. Cached under
    `cache_dir`/rec by the texts' digest, so every worker on a machine computes it once."""
    folder = minilm_dir(model_dir, "the recommendation track's text features")
    key = hashlib.sha256(("\n".join(item_texts) + "|" + Path(folder).name).encode()).hexdigest()[:16]
    if key not in _MEMO:
        path = Path(cache_dir or ".") / "rec" / f"text-{key}.npy"
        if not path.exists():
            feats = padded_rows(sentence_embeddings(list(item_texts), folder))
            atomic_write(path, lambda tmp: np.save(tmp, feats))
        _MEMO[key] = np.load(path)
    return _MEMO[key]


def visual_features(path: str, n_items: int) -> np.ndarray:
    """(items + 1) x D from an .npy (items x D) or an .npz with `features`, rows in the
    dataset's item order (ascending item id), row 0 zeros."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FeatureFileError(f"visual_features: no file {p}; give an .npy or .npz (features) with one row per item, or set it to null")
    if p not in _MEMO_VISUAL:
        raw = np.load(p, allow_pickle=False)
        feats = raw["features"] if isinstance(raw, np.lib.npyio.NpzFile) else raw
        if feats.ndim != 2 or len(feats) != n_items:
            raise FeatureFileError(f"visual_features {p} has shape {feats.shape}; it needs one row per item ({n_items} x D)")
        _MEMO_VISUAL[p] = padded_rows(feats)
    return _MEMO_VISUAL[p]


_MEMO_VISUAL: dict[Path, np.ndarray] = {}
