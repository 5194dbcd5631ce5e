"""Joining or starting the Ray cluster (once per process), saying where its dashboard and token are,
and the driver's environment variables every actor gets."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from bench.config import RuntimeConfig
from bench.errors import UserError


class RayUnavailable(UserError):
    pass


_INIT_LOCK = threading.Lock()


def ensure_ray(cfg: RuntimeConfig):
    """Connect to `--address`, or start a local cluster sized to this machine (once per
    process, also when a sweep's concurrent runs all ask at the same moment). Without an
    address Ray would join the local cluster started last, whichever it is (another user's,
    a test's on loopback, which it then fails to reach): joining is what `--address` is for."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    with _INIT_LOCK:
        if ray.is_initialized():
            return ray
        return _init_ray(ray, cfg)


def _init_ray(ray, cfg: RuntimeConfig):
    try:
        ctx = ray.init(address=cfg.address or "local", ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise RayUnavailable(f"cannot join the Ray cluster at {cfg.address} ({e}); check --address or drop it") from None
    url = getattr(ctx, "dashboard_url", None)
    from bench.progress import console

    console.print(f"[bold]ray[/] cluster resources {ray.cluster_resources()}; dashboard: {'http://' + url if url else 'not running'}")
    if url and token_auth_on():
        console.print(f"[bold]ray[/] the dashboard asks for a token: {token_location(os.environ)}", highlight=False, soft_wrap=True)
    return ray


def token_auth_on() -> bool:
    """Whether this Ray session uses token authentication (on by default for a cluster
    `ray.init` starts since Ray 2.5x; `RAY_AUTH_MODE=disabled` turns it off)."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # a Ray without token authentication
        return False
    return get_authentication_mode() == AuthenticationMode.TOKEN


def token_location(environ: dict[str, str]) -> str:
    """Where Ray reads the dashboard token from, in the order Ray looks."""
    if environ.get("RAY_AUTH_TOKEN"):
        return "it is the value of $RAY_AUTH_TOKEN"
    path = environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return f"it is in {path} (`ray get-auth-token` prints it)"


FORWARDED_PREFIXES = ("FEDAME_", "HF_", "TRANSFORMERS_")


def forwarded_environ(config: Any, prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The driver's environment variables a method may read on a worker: the harness's prefixes
    above and the method's own (`Server.worker_env`), any *_API_KEY, and every variable the
    method's config names in a field ending in `_env` (an API key's variable, say)."""
    named: set[str] = set()

    def scan(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, str) and k.endswith("_env"):
                    named.add(v)
                scan(v)

    scan(config.model_dump() if hasattr(config, "model_dump") else {})
    wanted = FORWARDED_PREFIXES + tuple(prefixes)
    return {k: v for k, v in os.environ.items() if k in named or k.startswith(wanted) or k.endswith("_API_KEY")}
