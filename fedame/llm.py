"""The decision maker: which expert a new class joins, or whether an expert is created or split.

An LLM behind any OpenAI-compatible endpoint (DeepSeek by default) answers in strict JSON,
validated before use. Answers are cached on disk under a digest of (endpoint, model, prompt), so a
rerun is reproducible and sends nothing. A deterministic rule on anchor geometry decides
when no key is configured, when the endpoint fails or answers badly, or by choice; every
decision records its source (llm / cache / heuristic), latency and a digest of the answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from bench.config import Section
from bench.errors import UserError
from fedame.anchors import display_name


class LLMConfig(Section):
    enabled: bool = True  # used only when the key variable is set
    base_url: str = "https://api.deepseek.com"
    model: str = "deepseek-chat"
    api_key_env: str = "DEEPSEEK_API_KEY"
    timeout_s: float = Field(20.0, gt=0)
    max_retries: int = Field(2, ge=0)
    temperature: float = Field(0.0, ge=0)
    cache: bool = True
    required: bool = False  # any fall-back to the rule is an error (CLI: --require-llm)


class LLMRequiredError(UserError):
    pass


class RuleConfig(Section):
    """The anchor-geometry rule (also the fallback)."""

    assign_threshold: float = 0.8  # cos(class anchor, expert anchor) needed to join an expert
    max_classes: int = Field(10, ge=2)  # an expert holding more is split
    min_spread: float = 0.5  # ... and so is one whose least similar pair of classes is below this


class LLMAnswer(BaseModel):
    action: Literal["assign", "new_expert", "split"]
    expert: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class ExpertView:
    id: int
    classes: tuple[int, ...]
    anchor: np.ndarray


@dataclass(frozen=True)
class Decision:
    action: str  # assign | new_expert | split
    expert: int | None  # the expert joined or split (None for new_expert)
    source: str  # llm | cache | heuristic
    latency_s: float
    response_digest: str | None
    reason: str
    fallback: bool = False  # the LLM path was meant to decide, and the rule did


SYSTEM = (
    "You organise a mixture-of-experts image classifier for continual learning. Each expert "
    "handles a group of semantically related classes. Answer with one JSON object only: "
    '{"action": "assign" | "new_expert" | "split", "expert": <expert id or null>, "reason": "<short>"}. '
    "assign: the new class joins expert <id>. new_expert: a new expert is created for it. "
    "split: expert <id> is split in two (its classes divided by similarity) and the new class "
    "joins the closer half; use it when an expert would grow too large or too diverse."
)


def brief(e: Exception) -> str:
    """An exception in one short line: its type and the first 80 characters of its message."""
    text = str(e).splitlines()[0][:80] if str(e) else ""
    return f"{type(e).__name__}: {text}"


class DecisionMaker:
    def __init__(
        self,
        llm: LLMConfig,
        rule: RuleConfig,
        class_names: tuple[str, ...],
        anchors: np.ndarray,
        cache_dir: Path | None,
        use_llm: bool = True,
        cluster_of: list[int] | None = None,
    ) -> None:
        self.llm, self.rule = llm, rule
        self.names, self.anchors = class_names, anchors
        self.cluster_of = cluster_of
        self.cache_dir = cache_dir / "llm" if cache_dir and llm.cache else None
        self.intended = use_llm and llm.enabled  # the config asks for LLM decisions
        # the key is read whenever the LLM is enabled: the clustering asks it even where the rule places classes
        self.api_key = os.environ.get(llm.api_key_env) if llm.enabled else None
        self._client = None
        self.fallback_reason: str | None = None  # the first reason the rule decided instead

    def __getstate__(self) -> dict:
        """A checkpoint (bench/checkpoint.py) holds neither the API key nor the network client."""
        return {**self.__dict__, "api_key": None, "_client": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.api_key = os.environ.get(self.llm.api_key_env) if self.llm.enabled else None

    def fall_back(self, cls: int, experts: list[ExpertView], why: str, latency: float | None = None, digest: str | None = None) -> Decision:
        """The rule's decision where the LLM was meant to decide: recorded, or an error when required."""
        if self.llm.required:
            raise LLMRequiredError(
                f"methods.fedame.llm.required: {why} (class {display_name(self.names[cls])!r}); "
                f"check {self.llm.base_url} and ${self.llm.api_key_env}, or drop --require-llm"
            )
        self.fallback_reason = self.fallback_reason or why
        d = self.heuristic(cls, experts, note=f"{why}; ")
        return Decision(d.action, d.expert, d.source, d.latency_s if latency is None else latency, digest, d.reason, fallback=True)

    @property
    def uses_llm(self) -> bool:
        return self.intended and bool(self.api_key)

    # ------------------------------------------------------------------ the rule
    def heuristic(self, cls: int, experts: list[ExpertView], note: str = "") -> Decision:
        t0 = time.perf_counter()
        if not experts:
            return Decision("new_expert", None, "heuristic", time.perf_counter() - t0, None, note + "no expert yet")
        sims = np.array([float(self.anchors[cls] @ e.anchor) for e in experts])
        if self.cluster_of is not None:  # a known semantic cluster wins over raw similarity
            mates = [i for i, e in enumerate(experts) if any(self.cluster_of[c] == self.cluster_of[cls] for c in e.classes)]
            if not mates:
                return Decision("new_expert", None, "heuristic", time.perf_counter() - t0, None, note + "first class of its cluster")
            target = max(mates, key=lambda i: sims[i])
            why = f"shares its cluster with expert {experts[target].id} (sim {sims[target]:.2f})"
        else:
            target = int(sims.argmax())
            if sims[target] < self.rule.assign_threshold:
                return Decision(
                    "new_expert",
                    None,
                    "heuristic",
                    time.perf_counter() - t0,
                    None,
                    note + f"max similarity {sims[target]:.2f} < {self.rule.assign_threshold}",
                )
            why = f"most similar expert (sim {sims[target]:.2f})"
        e = experts[target]
        members = [*e.classes, cls]
        spread = float(np.min(self.anchors[members] @ self.anchors[members].T))
        # with a known semantic cluster only the size limit applies; otherwise also the spread
        too_big = len(members) > self.rule.max_classes
        too_diverse = self.cluster_of is None and spread < self.rule.min_spread
        if (too_big or too_diverse) and len(e.classes) < 2:  # nothing to split: start a new expert
            return Decision(
                "new_expert",
                None,
                "heuristic",
                time.perf_counter() - t0,
                None,
                note + f"joining expert {e.id} would be too diverse (sim {spread:.2f})",
            )
        if too_big or too_diverse:
            return Decision(
                "split",
                e.id,
                "heuristic",
                time.perf_counter() - t0,
                None,
                note + f"expert {e.id} would hold {len(members)} classes (min pair sim {spread:.2f})",
            )
        return Decision("assign", e.id, "heuristic", time.perf_counter() - t0, None, note + why)

    # ------------------------------------------------------------------ the LLM
    def prompt(self, cls: int, experts: list[ExpertView]) -> str:
        lines = [f'New class: "{display_name(self.names[cls])}".', "Experts:"]
        for e in experts:
            sim = float(self.anchors[cls] @ e.anchor)
            names = ", ".join(display_name(self.names[c]) for c in e.classes)
            lines.append(f"- expert {e.id}: classes [{names}]; anchor similarity to the new class {sim:.3f}")
        if not experts:
            lines.append("- (none yet)")
        lines.append(f"An expert should hold at most {self.rule.max_classes} classes. Answer with the JSON object only.")
        return "\n".join(lines)

    def _client_or_none(self):
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(
                api_key=self.api_key,
                base_url=self.llm.base_url,
                timeout=self.llm.timeout_s,
                max_retries=self.llm.max_retries,
            )
        return self._client

    def _cache_path(self, prompt: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.llm.base_url, self.llm.model, SYSTEM, prompt]).encode()).hexdigest()
        return self.cache_dir / f"{key}.json"

    def _ask(self, prompt: str) -> tuple[str, str]:
        """Raw answer text and its source (cache or llm)."""
        path = self._cache_path(prompt)
        if path is not None and path.exists():
            return json.loads(path.read_text())["raw"], "cache"
        resp = self._client_or_none().chat.completions.create(
            model=self.llm.model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            temperature=self.llm.temperature,
            response_format={"type": "json_object"},
        )
        raw = resp.choices[0].message.content or ""
        return raw, "llm"

    def _store(self, prompt: str, raw: str) -> None:
        path = self._cache_path(prompt)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"raw": raw, "model": self.llm.model}))
            os.replace(tmp, path)

    def validate(self, raw: str, experts: list[ExpertView]) -> LLMAnswer:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("answer is not a JSON object")
        ans = LLMAnswer.model_validate(data)
        ids = {e.id for e in experts}
        if ans.action in ("assign", "split") and ans.expert not in ids:
            raise ValueError(f"expert {ans.expert} does not exist (have {sorted(ids)})")
        if ans.action == "split" and len(next(e for e in experts if e.id == ans.expert).classes) < 2:
            raise ValueError(f"expert {ans.expert} has fewer than 2 classes to split")
        return ans

    def decide(self, cls: int, experts: list[ExpertView]) -> Decision:
        if not self.intended:
            return self.heuristic(cls, experts)
        if not self.uses_llm:
            return self.fall_back(cls, experts, f"no LLM key: ${self.llm.api_key_env} is not set")
        prompt = self.prompt(cls, experts)
        t0 = time.perf_counter()
        try:
            raw, source = self._ask(prompt)
        except Exception as e:  # network, HTTP status, timeout: all fall back to the rule
            return self.fall_back(cls, experts, f"llm failed ({brief(e)})")
        latency = time.perf_counter() - t0
        digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
        try:
            ans = self.validate(raw, experts)
        except (ValueError, ValidationError) as e:
            return self.fall_back(cls, experts, f"llm answer rejected ({str(e).splitlines()[0][:80]})", latency, digest)
        if source == "llm":
            self._store(prompt, raw)
        expert = ans.expert if ans.action != "new_expert" else None
        return Decision(ans.action, expert, source, latency, digest, ans.reason)


def ask_clusters(dm: DecisionMaker, names: list[str], k: int) -> tuple[list[int] | None, str, str | None]:
    """Ask the LLM to group class names into k semantic clusters: (each class's cluster, or None
    where it could not; the source, llm or cache; why not). The caller falls back to k-means
    and records that it did."""
    if not dm.llm.enabled:
        return None, "llm", "llm.enabled is false"
    if not dm.api_key:
        return None, "llm", f"no LLM key: ${dm.llm.api_key_env} is not set"
    prompt = (
        f"Group these {len(names)} class names into {k} semantic clusters. Answer with one JSON object "
        '{"clusters": [[class names], ...]} using every name exactly once.\nClasses: ' + json.dumps([display_name(n) for n in names])
    )
    try:
        raw, source = dm._ask(prompt)
    except Exception as e:  # network, HTTP status, timeout
        return None, "llm", f"llm failed ({brief(e)})"
    try:
        groups = json.loads(raw)["clusters"]
        index = {display_name(n): i for i, n in enumerate(names)}
        cluster_of = [-1] * len(names)
        for g, members in enumerate(groups):
            for m in members:
                if m not in index:
                    raise ValueError(f"unknown class {m!r}")
                if cluster_of[index[m]] != -1:
                    raise ValueError(f"class {m!r} is in two clusters")
                cluster_of[index[m]] = g
        if -1 in cluster_of:
            raise ValueError(f"class {names[cluster_of.index(-1)]!r} is in no cluster")
    except (ValueError, KeyError, TypeError) as e:
        return None, source, f"llm clusters rejected ({brief(e)})"
    if source == "llm":
        dm._store(prompt, raw)
    return cluster_of, source, None
