"""`fedame` is the design: what the mixture itself learns (no Gaussian score exists in it),
routing by fixed cluster anchors, prompts bounded around their anchors, and the LLM's
clustering recorded, fallback included."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.api import ClientData, TaskInfo, TrainContext
from bench.cli import app
from bench.results import read_table
from fedame.anchors import AnchorConfig, normalize
from fedame.method import FedAME, FedAMEConfig, FedAMEPlusConfig
from fedame.model import on_device
from fedame.router import route
from tests.llm_server import FakeLLM
from tests.methods.envs import synthetic_env

DIM, CLUSTERS, PER_CLUSTER = 16, 3, 2
NAMES = tuple(f"c{i}" for i in range(CLUSTERS * PER_CLUSTER))
CLUSTER_OF = tuple(c // PER_CLUSTER for c in range(len(NAMES)))  # classes 2k, 2k+1 form cluster k


def _world(seed: int = 0):
    """Separable clusters: each cluster a direction, its classes two nearby offsets of it; the
    class anchors follow the same geometry in the anchor space."""
    g = np.random.default_rng(seed)
    cluster_dir = normalize(g.normal(size=(CLUSTERS, DIM))) * 6.0
    centres = np.stack([cluster_dir[k] + 2.0 * normalize(g.normal(size=DIM)) for k in CLUSTER_OF])
    anchors = normalize(np.stack([cluster_dir[k] / 6.0 + 0.3 * normalize(g.normal(size=DIM)) for k in CLUSTER_OF])).astype(np.float32)

    def draw(m):
        y = np.repeat(np.arange(len(centres)), m)
        return (centres[y] + g.normal(size=(len(y), DIM))).astype(np.float32), y

    return anchors, draw(60), draw(30)


def _xor_world(seed: int):
    """Two clusters of two classes; the class is the sign of one feature direction, read one way
    in the first cluster and the other way in the second (the anchors say so): a shared linear
    map into the anchor space cannot read it, an expert per cluster can."""
    g = np.random.default_rng(seed)
    cluster_dir = normalize(g.normal(size=(2, DIM)))
    sign = normalize(g.normal(size=DIM))
    centres = np.stack(
        [cluster_dir[0] * 3 + 2 * sign, cluster_dir[0] * 3 - 2 * sign, cluster_dir[1] * 3 + 2 * sign, cluster_dir[1] * 3 - 2 * sign]
    )
    anchors = normalize(np.stack([cluster_dir[0] + sign, cluster_dir[0] - sign, cluster_dir[1] - sign, cluster_dir[1] + sign]))

    def draw(m):
        y = np.repeat(np.arange(4), m)
        return (centres[y] + 0.7 * g.normal(size=(len(y), DIM))).astype(np.float32), y

    return anchors.astype(np.float32), draw(80), draw(40)


def _server(tmp_path, world=_world, names=NAMES, clusters=CLUSTER_OF, **overrides):
    anchors, train, test = world()
    path = tmp_path / "anchors.npz"
    np.savez(path, features=anchors, class_names=np.array(names))
    env = synthetic_env(DIM, names, clusters)
    cfg = FedAMEConfig(
        anchors=AnchorConfig(source="file", file=str(path)), expert_hidden=16, decisions="heuristic", batch_size=None, **overrides
    )
    server = FedAME(cfg, env)
    server.setup()
    return server, env, train, test


def _train(server, env, train, tasks=((0, 2), (1, 4), (3, 5)), rounds=4):
    """Class-incremental: each task's classes, their samples halved between two clients."""
    client = FedAME.ClientClass(server.config, env)
    xtr, ytr = train
    half = np.arange(len(ytr)) % 2
    seen: list[int] = []
    for t, classes in enumerate(tasks):
        seen += list(classes)
        split = {0: classes, 1: classes}
        server.begin_task(TaskInfo(t, classes, tuple(seen), split))
        for r in range(rounds):
            ups = []
            for k in split:
                m = np.isin(ytr, classes) & (half == k)
                ups.append(client.local_train(server.payload_for(k), ClientData(k, xtr[m], ytr[m]), TrainContext(0, t, r, k, env.train)))
            server.aggregate(ups)
        server.end_task()
    return server


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    server, env, train, test = _server(tmp_path_factory.mktemp("design"))
    return _train(server, env, train), test


def _accuracy(server, test) -> float:
    x, y = test
    return float((server.predict(x) == y).mean())


def test_design_has_no_score_outside_the_mixture():
    cfg = FedAMEConfig()
    assert (cfg.gaussian_weight, cfg.prototype_weight, cfg.prompt_space, cfg.route_targets) == (0, 0, "anchor", "cluster")
    plus = FedAMEPlusConfig()
    assert (plus.gaussian_weight, plus.prompt_space, plus.route_targets) == (1, "feature", "owned")


def test_the_mixture_alone_learns(tmp_path):
    """One task of all six classes: the design's mixture (it has no other score) classifies
    far above chance (1/6)."""
    torch.manual_seed(0)
    server, env, train, test = _server(tmp_path)
    assert _accuracy(_train(server, env, train, tasks=(tuple(range(6)),)), test) > 0.7


def test_the_mixture_beats_a_frozen_random_router_where_the_cluster_decides_the_class(tmp_path, monkeypatch):
    """Where a class can only be read knowing its cluster, the design's routing (cluster anchors,
    routing loss; one expert per sample) beats the same model with routing targets drawn at
    random and no routing loss, on average over three generated worlds. (On the separable world
    above, where a shared map reads every class, the two score alike: docs/fedame.md.)"""
    import functools

    scores = {"learnt": [], "random": []}
    for seed in range(3):
        for kind in scores:
            g = np.random.default_rng(seed + 10)
            with monkeypatch.context() as m:
                if kind == "random":
                    m.setattr(
                        "fedame.pool.ExpertPool._founding_anchor", lambda self, c, g=g: normalize(g.normal(size=DIM)).astype(np.float32)
                    )
                torch.manual_seed(seed)
                world = functools.partial(_xor_world, seed)
                over = {"top_k": 1, **({"lambdas": {"route": 0.0}} if kind == "random" else {})}
                server, env, train, test = _server(tmp_path, world, NAMES[:4], (0, 0, 1, 1), **over)
                scores[kind].append(_accuracy(_train(server, env, train, tasks=((0, 1, 2, 3),)), test))
    learnt, random_router = np.mean(scores["learnt"]), np.mean(scores["random"])
    assert learnt > 0.85 and learnt > random_router + 0.05, scores


def test_routing_sends_samples_to_their_clusters_expert(trained):
    server, (x, y) = trained
    alive = server.pool.alive
    with torch.no_grad():
        u = server.proj(torch.from_numpy(x))
        scores, _, _ = route(u, on_device(server.pool.expert_anchors(alive)), server.config.route_temperature, 1)
    owner = np.array([alive.index(server.pool.owner[int(c)]) for c in y])
    routed = float((scores.argmax(1).numpy() == owner).mean())
    assert routed > 1 / CLUSTERS + 0.4, routed  # three separable clusters: well above chance


def test_routing_targets_are_cluster_anchors_that_do_not_move_when_a_class_joins(tmp_path):
    server, *_ = _server(tmp_path)
    server.begin_task(TaskInfo(0, (0, 2), (0, 2), {0: (0, 2)}))
    before = {e: server.pool.expert_anchor(e).copy() for e in server.pool.alive}
    for e in server.pool.alive:  # the anchor of the cluster's whole definition, not of the classes owned so far
        k = CLUSTER_OF[server.pool.classes[e][0]]
        members = [c for c in range(len(NAMES)) if CLUSTER_OF[c] == k]
        np.testing.assert_allclose(before[e], normalize(server.anchors[members].mean(0)), atol=1e-6)
    server.begin_task(TaskInfo(1, (1, 3), (0, 2, 1, 3), {0: (1, 3)}))  # each joins its cluster's expert
    assert server.pool.alive == list(before)
    for e in before:
        np.testing.assert_array_equal(server.pool.expert_anchor(e), before[e])
    owned, *_ = _server(tmp_path, route_targets="owned")  # the switch: targets that move
    owned.begin_task(TaskInfo(0, (0, 2), (0, 2), {0: (0, 2)}))
    first = {e: owned.pool.expert_anchor(e).copy() for e in owned.pool.alive}
    owned.begin_task(TaskInfo(1, (1, 3), (0, 2, 1, 3), {0: (1, 3)}))
    assert all(not np.allclose(owned.pool.expert_anchor(e), first[e]) for e in first)


def test_a_split_re_derives_both_halves_anchors(tmp_path):
    server, *_ = _server(tmp_path, rule={"max_classes": 2})
    server.begin_task(TaskInfo(0, (0, 1), (0, 1), {0: (0, 1)}))
    (e,) = server.pool.alive
    child = server.pool.split(e)
    for half in (e, child):
        np.testing.assert_allclose(server.pool.expert_anchor(half), normalize(server.anchors[server.pool.classes[half]].mean(0)), atol=1e-6)


def test_prompt_means_stay_within_the_residual_bound(trained):
    server, _ = trained
    bound = server.config.max_residual_norm
    assert server.prompts.residual, "no prompt was built"
    for r in server.prompts.residual.values():
        assert np.linalg.norm(r) <= bound + 1e-6
    arrays = server.payload_for(0).arrays  # what clients replay from
    mu = arrays["prompt_mu"] - server.anchors[arrays["prompt_classes"]]
    assert np.linalg.norm(mu, axis=1).max() <= bound + 1e-5
    assert not server.feature_prompts.mean and "fp_mu" not in arrays  # no feature-space prompt in the design


def test_replay_from_the_anchor_prompts_keeps_old_classes(trained, tmp_path):
    server, test = trained
    x, y = test
    first = np.isin(y, (0, 2))
    with_replay = float((server.predict(x) == y)[first].mean())
    torch.manual_seed(0)
    off, env, train, _ = _server(tmp_path, replay=False)
    without = float((_train(off, env, train).predict(x) == y)[first].mean())
    assert with_replay > without, (with_replay, without)


def _run_with_llm_clusters(tmp_path, monkeypatch, answer, mode="valid"):
    monkeypatch.setenv("FEDAME_TEST_KEY", "sk-local")
    with FakeLLM() as llm:
        llm.mode, llm.answer = mode, answer
        out = tmp_path / "r"
        sets = [
            f"methods.fedame.llm.base_url={llm.base_url}",
            "methods.fedame.llm.api_key_env=FEDAME_TEST_KEY",
            "methods.fedame.llm.max_retries=0",
            "methods.fedame.clusters.source=llm",
            "methods.fedame.clusters.k=2",
            "methods.fedame.decisions=heuristic",
        ]
        args = ["run", "--config", "smoke", "--methods", "fedame", "--out", str(out)] + [a for s in sets for a in ("--set", s)]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        return read_table(out, "decisions").to_pylist(), read_table(out, "summary").to_pylist()[0], llm.requests


def test_llm_clusters_decide_through_a_local_openai_server(tmp_path, monkeypatch):
    names = [f"class {i}" for i in range(6)]  # the smoke dataset's class names, as the prompt shows them
    rows, summary, requests = _run_with_llm_clusters(tmp_path, monkeypatch, {"clusters": [names[:3], names[3:]]})
    assert len(requests) == 1 and "semantic clusters" in requests[0]["messages"][-1]["content"]
    (row,) = [r for r in rows if r["action"] == "clusters"]
    assert row["source"] == "llm" and not row["fallback"]
    experts = {r["class_id"]: r["expert"] for r in rows if r["action"] != "clusters"}
    assert len({experts[c] for c in range(3)}) == 1 and len({experts[c] for c in range(3, 6)}) == 1  # one expert per LLM cluster
    assert summary["decisions_fallback"] == 0


def test_a_failed_llm_clustering_is_a_recorded_fallback(tmp_path, monkeypatch):
    rows, summary, _ = _run_with_llm_clusters(tmp_path, monkeypatch, {}, mode="malformed")
    (row,) = [r for r in rows if r["action"] == "clusters"]
    assert row["fallback"] and row["source"] == "heuristic" and "k-means" in row["reason"]
    assert summary["decisions_fallback"] == 1 and "rejected" in summary["fallback_reason"]


def test_drift_compensation_moves_old_prompts_within_the_bound_and_is_off_in_the_design(tmp_path):
    """`prompt_drift: sdc` moves an old class's prompt mean after its task ended (by the pooled
    drift of the current task's features), the residual still bounded; the design leaves it
    where its task left it."""

    def trained_on(tasks, **overrides):
        torch.manual_seed(0)
        server, env, train, _ = _server(tmp_path, **overrides)
        return _train(server, env, train, tasks=tasks)

    after_first = trained_on(((0, 2),))
    design, sdc = trained_on(((0, 2), (1, 4))), trained_on(((0, 2), (1, 4)), prompt_drift="sdc")
    for c in (0, 2):  # old classes during task 1: absent from its data
        np.testing.assert_array_equal(design.prompts.mean(c), after_first.prompts.mean(c))
        assert np.linalg.norm(sdc.prompts.mean(c) - after_first.prompts.mean(c)) > 1e-3
        assert np.linalg.norm(sdc.prompts.residual[c]) <= sdc.config.max_residual_norm + 1e-6
