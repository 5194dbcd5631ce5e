"""What FedAME writes beside the harness's tables: every expert decision (the `decisions`
table), where they came from (summary columns), and the line the CLI prints after a run."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from bench.api import RunFlag

DECISIONS = pa.schema(
    [
        ("task", pa.int64()),
        ("class_id", pa.int64()),
        ("class_name", pa.string()),
        ("action", pa.string()),
        ("expert", pa.int64()),
        ("source", pa.string()),  # llm / cache / rule
        ("latency_s", pa.float64()),
        ("response_digest", pa.string()),
        ("reason", pa.string()),
        ("fallback", pa.bool_()),  # the rule decided where the LLM was meant to
    ]
)

SUMMARY_COLUMNS = (
    ("decisions_llm", pa.int64()),
    ("decisions_cache", pa.int64()),
    ("decisions_rule", pa.int64()),
    ("decisions_fallback", pa.int64()),  # the rule decided where the LLM was meant to
    ("fallback_reason", pa.string()),  # the first reason it did
)


def require_llm(method: str) -> RunFlag:
    """`--require-llm` for a FedAME method (its own section; methods sharing the flag each add theirs)."""
    return RunFlag(
        "require-llm",
        "FedAME: any expert decision the LLM cannot make is an error, not a rule fallback",
        (f"methods.{method}.llm.required=true",),
    )


def decision_counts(decided: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary columns: decisions by source, how many fell back to the rule and the first reason."""
    if not decided:
        return {}
    sources = [d.get("source") for d in decided]
    fell = [d for d in decided if d.get("fallback")]
    return {
        "decisions_llm": sources.count("llm"),
        "decisions_cache": sources.count("cache"),
        "decisions_rule": len(sources) - sources.count("llm") - sources.count("cache"),
        "decisions_fallback": len(fell),
        "fallback_reason": fell[0]["reason"].split("; ")[0] if fell else None,
    }


def decision_line(summary: dict[str, Any]) -> str | None:
    """Where a run's expert decisions came from, and why any fell back to the rule."""
    s = summary
    if s.get("decisions_rule") is None:
        return None
    n = s["decisions_llm"] + s["decisions_cache"] + s["decisions_rule"]
    line = f"{n} expert decisions: {s['decisions_llm']} llm, {s['decisions_cache']} cache, {s['decisions_rule']} rule"
    if s["decisions_fallback"]:
        line += f"; {s['decisions_fallback']} fell back to the rule ({s['fallback_reason']})"
    return line
