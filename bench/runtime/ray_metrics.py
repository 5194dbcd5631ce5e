"""Progress metrics exported through `ray.util.metrics` (the dashboard's Prometheus endpoint)."""

from __future__ import annotations

from typing import Any

_METRICS: dict[str, Any] = {}


def progress_metrics() -> dict[str, Any]:
    if not _METRICS:
        from ray.util.metrics import Counter, Gauge

        keys = ("run_id", "method", "alpha", "seed")
        _METRICS.update(
            rounds=Counter("fedame_rounds_completed", "federated rounds completed", tag_keys=keys),
            updates=Counter("fedame_client_updates", "client updates aggregated", tag_keys=keys),
            bytes=Counter("fedame_bytes_moved", "payload + update bytes moved", tag_keys=keys),
            retries=Counter("fedame_client_retries", "client jobs retried after an actor failure", tag_keys=keys),
            accuracy=Gauge("fedame_acc_seen", "latest accuracy on all seen classes", tag_keys=keys),
        )
    return _METRICS
