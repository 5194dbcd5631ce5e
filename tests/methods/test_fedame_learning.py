"""FedAME learns: a small generated task with separable classes, driven through the real
server and client (no backbone), two clients with disjoint class halves."""

import numpy as np
import pytest
import torch

from bench.api import ClientData, MethodEnv, TaskInfo, TrainContext, TrainSettings
from bench.federation import mean_aggregator
from fedame.anchors import AnchorConfig
from fedame.method import FedAME, FedAMEConfig, FedAMEPlus, FedAMEPlusConfig
from tests.methods.envs import synthetic_env

DIM, TASKS, PER_TASK = 16, 3, 2


def _data(seed: int = 0, n: int = 60):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(TASKS * PER_TASK, DIM)) * 3.0

    def draw(m):
        y = np.repeat(np.arange(len(centres)), m)
        return (centres[y] + g.normal(size=(len(y), DIM))).astype(np.float32), y

    return draw(n), draw(30)


def run(plus: bool = True, **overrides):
    """Trains 3 tasks x 2 classes; returns (per-task accuracy after the last task, server, updates).
    `plus`: the variant `fedame_plus` (the improvements' tests), else the design `fedame`.
    Minibatches are the environment's 16 unless overridden: a client holds 60 samples, which
    FedAME's default of 128 would train in one step per epoch."""
    overrides = {"batch_size": None, **overrides}
    Method, Config = (FedAMEPlus, FedAMEPlusConfig) if plus else (FedAME, FedAMEConfig)
    torch.manual_seed(0)
    names = tuple(f"c{i}" for i in range(TASKS * PER_TASK))
    env = synthetic_env(DIM, names, (0, 0, 1, 1, 2, 2))
    cfg = Config(anchors=AnchorConfig(source="random", dim=16), expert_hidden=16, decisions="heuristic", **overrides)
    server, client = Method(cfg, env), Method.ClientClass(cfg, env)
    server.setup()
    (xtr, ytr), (xte, yte) = _data()
    updates = []
    for task in range(TASKS):
        classes = tuple(range(task * PER_TASK, (task + 1) * PER_TASK))
        split = {0: classes[:1], 1: classes[1:]}  # each client holds one class of the task
        server.begin_task(TaskInfo(task, classes, tuple(range((task + 1) * PER_TASK)), split))
        for rnd in range(4):
            round_updates = []
            for k, mine in split.items():
                m = np.isin(ytr, mine)
                ctx = TrainContext(0, task, rnd, k, env.train)
                round_updates.append(client.local_train(server.payload_for(k), ClientData(k, xtr[m], ytr[m]), ctx))
            server.aggregate(round_updates)
            updates += round_updates
        server.end_task()
    pred = server.predict(xte)
    per_task = [float((pred == yte)[yte // PER_TASK == j].mean()) for j in range(TASKS)]
    return per_task, server, updates


@pytest.fixture(scope="module")
def with_replay():
    return run()


def test_fedame_learns_every_task_and_replay_keeps_old_ones(with_replay):
    acc, _, updates = with_replay
    chance = 1 / (TASKS * PER_TASK)
    assert min(acc) > 0.8, acc  # every task, including the first two, well above chance
    assert sum(u.meta["replayed"] for u in updates) > 0
    # replay acts on the mixture: measured with the prompts' Gaussian scores off on both sides
    mixture, _, _ = run(gaussian_weight=0)
    no_replay, _, updates_off = run(replay=False, gaussian_weight=0)
    assert sum(u.meta["replayed"] for u in updates_off) == 0  # the switch draws no prompt sample
    # without replay only the KL to the previous model and the prototype term protect old
    # classes: the first task, two models back, loses much of what it had
    assert mixture[0] > no_replay[0] + 0.2, (mixture, no_replay)
    assert np.mean(mixture[:-1]) > np.mean(no_replay[:-1]) and chance < 0.2


def test_gaussian_scores_keep_old_classes_without_replay():
    """The prompts' Gaussian term does not forget: with replay off it alone keeps task 0."""
    off, _, _ = run(replay=False, gaussian_weight=0)
    on, server, _ = run(replay=False)
    assert on[0] > off[0] + 0.2, (on, off)
    (_, _), (xte, yte) = _data()
    gaussian_only = server.predict(xte, mixture=False, gaussian=True)
    assert (gaussian_only == yte).mean() > 0.9  # separable Gaussian classes: the prompts classify them
    assert not np.array_equal(server.predict(xte, gaussian=False), server.predict(xte))  # the switch changes predictions


def test_gaussian_weight_needs_feature_prompts():
    with pytest.raises(ValueError, match="prompt_space: feature"):
        FedAMEPlusConfig(prompt_space="anchor")


def test_old_behaviour_is_reachable_and_shows_the_frozen_projector_limit(with_replay):
    acc, server, _ = run(prompt_space="anchor", freeze_projector_after=0, replay_classes="old", gaussian_weight=0)
    assert not server.feature_prompts.mean  # the old behaviour keeps no feature-space prompt
    assert acc[0] > 0.4, acc  # learnt while the projector trained
    # docs/fedame.md's diagnosis: new classes cannot be placed through the frozen projector
    assert acc[-1] < with_replay[0][-1] - 0.3, (acc, with_replay[0])


def test_feature_prompts_match_the_data_they_summarise(with_replay):
    _, server, _ = with_replay
    (xtr, ytr), _ = _data()
    for c in range(TASKS * PER_TASK):
        np.testing.assert_allclose(server.feature_prompts.mean[c], xtr[ytr == c].mean(0), rtol=1e-5, atol=1e-5)
        assert server.feature_prompts.count[c] == (ytr == c).sum()


def test_a_class_that_comes_back_merges_its_new_data_with_its_settled_prompt():
    """A class reported again in a later task (a new domain of it) gets the prompt of all its
    data, as if every sample had been reported at once, however many rounds its reports take;
    one reported once keeps its prompt."""
    from fedame.feature_prompts import FeaturePromptBank, dense_report
    from fedame.feature_prompts import client_report as report_of

    def client_report(x: torch.Tensor, y: torch.Tensor, n: int, rank: int) -> dict[str, np.ndarray]:
        return dense_report(report_of(x, y, n, rank), n)

    g = np.random.default_rng(0)
    d, rank = 6, 6  # rank >= d: the merge is exact, nothing is truncated
    first = torch.tensor(g.normal(size=(40, d)))
    later = torch.tensor(g.normal(loc=2.0, scale=0.5, size=(25, d)))  # another domain: shifted, narrower
    y1, y2 = torch.zeros(40, dtype=torch.long), torch.zeros(25, dtype=torch.long)
    bank = FeaturePromptBank(rank)
    bank.update(np.array([0]), [client_report(first[:22], y1[:22], 1, rank), client_report(first[22:], y1[22:], 1, rank)])
    other = FeaturePromptBank(rank)
    other.update(np.array([7]), [client_report(first, y1, 1, rank)])
    bank.mean[7], bank.factor[7], bank.iso[7], bank.count[7] = other.mean[7], other.factor[7], other.iso[7], other.count[7]
    kept = (bank.mean[7].copy(), bank.factor[7].copy())
    bank.settle()  # the next task begins; its clients report over two rounds
    early, late = client_report(later[:10], y2[:10], 1, rank), client_report(later[10:], y2[10:], 1, rank)
    bank.update(np.array([0]), [early])
    bank.update(np.array([0]), [early, late])  # every report so far: the first rebuild is not counted twice

    every = torch.cat([first, later]).numpy()
    cov = lambda c: bank.factor[c] @ bank.factor[c].T + bank.iso[c] * np.eye(d)
    assert bank.count[0] == 65
    np.testing.assert_allclose(bank.mean[0], every.mean(0), atol=1e-6)
    np.testing.assert_allclose(cov(0), np.cov(every.T), atol=1e-5)  # within and between domains
    np.testing.assert_array_equal(bank.mean[7], kept[0])  # class 7 did not come back: its prompt is unchanged
    np.testing.assert_array_equal(bank.factor[7], kept[1])
    # without the settled prompt it would be the later domain's alone
    assert np.abs(bank.mean[0] - later.numpy().mean(0)).max() > 0.5


def test_single_expert_keeps_one_and_download_all_sends_every_expert():
    _, server, _ = run(single_expert=True)
    assert len(server.pool.alive) == 1
    _, server, _ = run()
    assert len(server.pool.alive) == 3  # one per cluster
    held = {k for k in server.payload_for(0).arrays if k.startswith("expert.")}
    assert {int(k.split(".")[1]) for k in held} == {server.pool.owner[c] for c in server.client_classes[0]}
    server.config = server.config.model_copy(update={"download_all_experts": True})
    every = {int(k.split(".")[1]) for k in server.payload_for(0).arrays if k.startswith("expert.")}
    assert every == set(server.pool.alive)


def test_default_config_is_the_seed_setting():
    from bench.loader import load_config, method_config

    cfg = load_config("default")
    sc, tr = cfg.scenario, cfg.training
    assert cfg.data.dataset == "cifar10" and list(sc.tasks) == [4, 4, 2] and sc.num_clients == 5
    assert sc.partition == "dirichlet" and sc.alpha == 0.5 and (tr.rounds, tr.local_epochs) == (100, 5)
    fed = method_config(cfg, "fedame").model_copy(update={"anchors": AnchorConfig(source="random", dim=16)})
    names = tuple(sc.class_order)
    env = MethodEnv(
        aggregator=mean_aggregator(),
        feature_dim=8,
        num_classes=10,
        class_names=names,
        dataset="cifar10",
        run_seed=0,
        num_clients=5,
        train=TrainSettings(1, 8, "sgd", 0.05, 0.9, 0.0),
    )
    server = FedAME(fed, env)
    server.setup()
    server.begin_task(TaskInfo(0, (0, 1, 2, 3), (0, 1, 2, 3), {0: (0, 1, 2, 3)}))
    assert len(server.pool.alive) == 2  # the first task starts one expert per cluster
    vehicles = {names.index(n) for n in ("airplane", "automobile")}
    assert {tuple(sorted(v)) for v in server.pool.classes.values() if v} == {tuple(sorted(vehicles)), (2, 3)}
    for i, classes in ((1, (4, 5, 6, 7)), (2, (8, 9))):
        server.begin_task(TaskInfo(i, classes, tuple(range(max(classes) + 1)), {0: classes}))
    assert len(server.pool.alive) == 2  # later classes join their cluster's expert


def test_diagnosis_measures_routing_and_prompt_quality(with_replay):
    from fedame.diagnose import diagnose_task

    _, server, _ = with_replay
    (xtr, ytr), (xte, yte) = _data()
    d = diagnose_task(server, TASKS - 1, [4, 5], (xtr, ytr), (xte, yte))
    assert d["experts"] == 3 and 0 <= d["route_acc"] <= 1
    # the reported accuracies agree with the predictions they summarise
    pred = server.predict(xte)
    assert d["acc_all"] == pytest.approx(float((pred == yte).mean()))
    assert d["acc_new"] == pytest.approx(float((pred == yte)[yte >= 4].mean()))
    # Gaussian prompts of Gaussian classes are as good as the real data to train a classifier on
    assert d["probe_on_real"] > 0.9 and d["probe_on_prompts"] > d["probe_on_real"] - 0.05


def test_contrastive_term_on_replayed_samples_keeps_old_classes_at_their_anchors(with_replay):
    """contrast_samples: replay pulls old classes' prompt samples to their anchors too, so after
    the last task the first task's real features sit closer to their anchors than when the
    term sees only the current task's real samples."""
    import torch.nn.functional as F

    (xtr, ytr), _ = _data()
    first = np.isin(ytr, range(PER_TASK))

    def closeness(server):
        with torch.no_grad():
            u = server.proj(torch.from_numpy(xtr[first]))
            a = torch.from_numpy(server.anchors[ytr[first]])
            return float(F.cosine_similarity(u, a).mean())

    _, replayed, _ = with_replay
    _, real_only, _ = run(contrast_samples="real")
    assert closeness(replayed) > closeness(real_only) + 0.05, (closeness(replayed), closeness(real_only))


def test_router_map_switch_sends_the_map_only_when_it_routes(with_replay):
    """router_map: false routes on the projected feature itself: no map crosses the wire either
    way, and FedAME still learns; router_map: true trains a d x d map and sends it."""
    acc, server, updates = with_replay
    mapped_acc, mapped, mapped_updates = run(router_map=True)
    assert not any(k.startswith("router.") for k in server.payload_for(0).arrays)
    assert not any(k.startswith("router.") for u in updates for k in u.arrays)
    assert "router.map.weight" in mapped.payload_for(0).arrays
    assert all("router.map.weight" in u.arrays for u in mapped_updates)
    assert not np.allclose(mapped.router.map.weight.detach().numpy(), np.eye(DIM))  # the map was trained
    assert min(acc) > 0.8 and min(mapped_acc) > 0.8, (acc, mapped_acc)


def test_updates_carry_statistics_of_the_clients_own_classes_only(with_replay):
    """A client sends per-class statistics and its once-per-task feature report for the classes
    it holds, not zero rows for every seen class (bytes up); the server's prompts still equal
    the pooled data (test_feature_prompts_match_the_data_they_summarise)."""
    _, _, updates = with_replay
    reports = [u for u in updates if "fp_count" in u.arrays]
    assert len(reports) == TASKS * 2  # once per client per task
    for u in updates:
        assert len(u.arrays["stat_pos"]) == 1 and u.arrays["stat_sum"].shape == (1, 16)  # each client holds one class
    for u in reports:
        assert len(u.arrays["fp_pos"]) == 1 and u.arrays["fp_factor"].shape[0] == 1
        np.testing.assert_array_equal(u.arrays["fp_pos"], u.arrays["stat_pos"])


def test_fedame_batch_size_is_its_own_minibatch(monkeypatch):
    import bench.training

    sizes = []
    real = bench.training.minibatches

    def spy(n, batch_size, gen):
        sizes.append(batch_size)
        return real(n, batch_size, gen)

    monkeypatch.setattr(bench.training, "minibatches", spy)
    run(batch_size=7)
    assert sizes and set(sizes) == {7}
    sizes.clear()
    run(batch_size=None)  # null: the training section's (16 in this test's environment)
    assert set(sizes) == {16}


def test_the_codec_round_trips_every_payload_and_update_without_copying(with_replay):
    """Decoding then encoding a real payload (teacher, experts held, feature prompts) or update
    gives back every key and the very same array objects: both sides read and write through
    fedame/payload.py, and nothing on the wire is spelt outside it."""
    from fedame.payload import Downlink, Uplink

    _, server, updates = with_replay
    sent = server.payload_for(0).arrays
    down = Downlink.decode(sent)
    assert down.teacher is not None and down.feature_prompts is not None and len(down.model.held) > 0
    again = down.encode()
    assert list(again) and set(again) == set(sent)
    assert all(again[k] is sent[k] for k in sent if k not in ("proj_frozen", "want_feature_stats"))
    for u in updates:
        up = Uplink.decode(u.arrays)
        assert set(up.experts) == set(u.meta["expert_samples"])
        assert set(up.encode()) == set(u.arrays) and all(up.encode()[k] is v for k, v in u.arrays.items())
    assert any(Uplink.decode(u.arrays).feature_report is not None for u in updates)
    assert any(Uplink.decode(u.arrays).feature_report is None for u in updates)
