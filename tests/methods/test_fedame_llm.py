"""The decision maker against a real HTTP server on 127.0.0.1 through the real openai client."""

import numpy as np
import pytest

from fedame.anchors import normalize
from fedame.llm import DecisionMaker, ExpertView, LLMConfig, RuleConfig
from tests.llm_server import FakeLLM

NAMES = ("apple", "pear", "bus", "train", "tiger")


@pytest.fixture
def anchors():
    rng = np.random.default_rng(0)
    fruit, vehicle, animal = normalize(rng.normal(size=(3, 16)))
    rows = [fruit, fruit, vehicle, vehicle, animal]
    return normalize(np.stack(rows) + 0.05 * rng.normal(size=(5, 16))).astype(np.float32)


@pytest.fixture
def server():
    with FakeLLM() as s:
        yield s


def maker(server, anchors, tmp_path, monkeypatch, **llm):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    cfg = LLMConfig(base_url=server.base_url, model="test-model", api_key_env="TEST_LLM_KEY", **{"max_retries": 0, **llm})
    return DecisionMaker(cfg, RuleConfig(assign_threshold=0.5), NAMES, anchors, tmp_path)


def experts(anchors):
    return [ExpertView(0, (0,), anchors[0]), ExpertView(1, (2,), anchors[2])]


def test_valid_answer_is_applied_and_prompt_is_informative(server, anchors, tmp_path, monkeypatch):
    server.answer = {"action": "assign", "expert": 0, "reason": "pears are fruit"}
    d = maker(server, anchors, tmp_path, monkeypatch).decide(1, experts(anchors))
    assert (d.action, d.expert, d.source, d.reason) == ("assign", 0, "llm", "pears are fruit")
    assert d.response_digest and d.latency_s >= 0
    prompt = server.requests[0]["messages"][1]["content"]
    assert '"pear"' in prompt and "expert 0: classes [apple]" in prompt and "similarity" in prompt
    assert server.requests[0]["model"] == "test-model"


def test_second_identical_request_is_a_cache_hit(server, anchors, tmp_path, monkeypatch):
    server.answer = {"action": "assign", "expert": 1, "reason": "vehicles"}
    dm = maker(server, anchors, tmp_path, monkeypatch)
    first = dm.decide(3, experts(anchors))
    again = maker(server, anchors, tmp_path, monkeypatch).decide(3, experts(anchors))  # a fresh process, same disk cache
    assert first.source == "llm" and again.source == "cache"
    assert (again.action, again.expert, again.response_digest) == (first.action, first.expert, first.response_digest)
    assert len(server.requests) == 1


def test_malformed_answer_falls_back_to_rule(server, anchors, tmp_path, monkeypatch):
    server.mode = "malformed"
    d = maker(server, anchors, tmp_path, monkeypatch).decide(1, experts(anchors))
    assert d.source == "heuristic" and "rejected" in d.reason
    assert (d.action, d.expert) == ("assign", 0)  # the rule puts pear with apple
    assert d.response_digest is not None  # the bad answer is still traceable


def test_answer_naming_unknown_expert_is_rejected(server, anchors, tmp_path, monkeypatch):
    server.answer = {"action": "assign", "expert": 7, "reason": "?"}
    d = maker(server, anchors, tmp_path, monkeypatch).decide(1, experts(anchors))
    assert d.source == "heuristic" and "does not exist" in d.reason


def test_http_error_falls_back_after_bounded_retries(server, anchors, tmp_path, monkeypatch):
    server.mode = "error"
    d = maker(server, anchors, tmp_path, monkeypatch, max_retries=1).decide(4, experts(anchors))
    assert d.source == "heuristic" and "llm failed" in d.reason
    assert d.action == "new_expert"  # a tiger is far from fruit and vehicles
    assert len(server.requests) == 2  # one try + one retry, then give up


def test_timeout_falls_back(server, anchors, tmp_path, monkeypatch):
    server.mode = "slow"
    server.slow_seconds = 2.0
    d = maker(server, anchors, tmp_path, monkeypatch, timeout_s=0.3).decide(1, experts(anchors))
    assert d.source == "heuristic" and "Timeout" in d.reason


def test_no_key_means_rule_and_no_request(server, anchors, tmp_path):
    cfg = LLMConfig(base_url=server.base_url, api_key_env="UNSET_KEY_FOR_TEST")
    d = DecisionMaker(cfg, RuleConfig(assign_threshold=0.5), NAMES, anchors, tmp_path).decide(1, experts(anchors))
    assert d.source == "heuristic" and server.requests == []


def test_every_fallback_is_marked_and_required_makes_it_an_error(server, anchors, tmp_path, monkeypatch):
    from fedame.llm import LLMRequiredError

    server.mode = "malformed"
    dm = maker(server, anchors, tmp_path, monkeypatch)
    d = dm.decide(1, experts(anchors))
    assert d.fallback and dm.fallback_reason.startswith("llm answer rejected")
    server.mode = "valid"
    server.answer = {"action": "assign", "expert": 0, "reason": "fruit"}
    assert not dm.decide(1, experts(anchors)).fallback  # an LLM answer is not a fallback
    server.mode = "malformed"
    with pytest.raises(LLMRequiredError, match="rejected"):
        maker(server, anchors, tmp_path / "other", monkeypatch, required=True).decide(1, experts(anchors))


def test_no_key_is_a_counted_fallback_through_the_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.results import read_table

    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["run", "--config", "smoke", "--methods", "fedame,fedavg", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "6 expert decisions: 0 llm, 0 cache, 6 rule; 6 fell back to the rule (no LLM key: $DEEPSEEK_API_KEY is not set)" in res.output
    rows = {r["method"]: r for r in read_table(out, "summary").to_pylist()}
    assert (rows["fedame"]["decisions_rule"], rows["fedame"]["decisions_fallback"]) == (6, 6)
    assert rows["fedavg"]["decisions_rule"] is None  # a method without decisions has none
    # --require-llm without a key: one error line before any work, nothing written
    res = CliRunner().invoke(app, ["run", "--config", "smoke", "--methods", "fedame", "--require-llm", "--out", str(tmp_path / "q")])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "DEEPSEEK_API_KEY is not set" in errors[0] and "Traceback" not in res.output
    assert not (tmp_path / "q" / "runs").exists()
    # decisions: heuristic is the rule by choice, not a fallback
    res = CliRunner().invoke(
        app,
        ["run", "--config", "smoke", "--methods", "fedame", "--out", str(tmp_path / "h"), "--set", "methods.fedame.decisions=heuristic"],
    )
    assert "6 rule" in res.output and "fell back" not in res.output


def test_a_usable_llm_makes_a_new_run_id(monkeypatch):
    from bench.loader import load_config
    from bench.sweep import expand

    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    cfg = load_config("smoke")
    without = {s.method: s.run_id for s in expand(cfg, ["fedame", "fedavg"], [0.5], [0])}
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-x")
    keyed = {s.method: s.run_id for s in expand(cfg, ["fedame", "fedavg"], [0.5], [0])}
    assert keyed["fedame"] != without["fedame"]  # a keyed rerun is not skipped as complete
    assert keyed["fedavg"] == without["fedavg"]
    heur = load_config("smoke", ["methods.fedame.decisions=heuristic"])
    assert len({s.run_id for s in expand(heur, ["fedame"], [0.5], [0])} | {s.run_id for s in expand(heur, ["fedame"], [0.5], [0])}) == 1
