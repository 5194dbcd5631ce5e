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
