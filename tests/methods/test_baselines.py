"""Baselines: FedProx(mu=0) == FedAvg, FedNCM == centralised means, MoE-Adapter trains only adapters."""

import math

import numpy as np
import torch

from bench.api import ClientData, MethodEnv, TaskInfo, TrainContext, TrainSettings
from bench.data import load_dataset
from bench.features import FeatureStore
from bench.federation import mean_aggregator
from bench.loader import load_config
from bench.runner import RunSpec, execute_run
from bench.runtime import LocalExecutor


def run(method, tmp_path, *overrides):
    cfg = load_config("smoke", list(overrides))
    ds = load_dataset(cfg.data, None)
    return execute_run(RunSpec(method, cfg), ds, FeatureStore(ds, cfg.backbone, tmp_path), LocalExecutor(), str(tmp_path))


def test_fedprox_with_mu_zero_equals_fedavg_exactly(tmp_path):
    avg = run("fedavg", tmp_path)
    prox = run("fedprox", tmp_path, "methods.fedprox.mu=0")
    assert [r["accuracy"] for r in avg.tables["accuracy"]] == [r["accuracy"] for r in prox.tables["accuracy"]]
    assert [r["loss"] for r in avg.tables["rounds"]] == [r["loss"] for r in prox.tables["rounds"]]
    prox_mu = run("fedprox", tmp_path, "methods.fedprox.mu=1.0")
    assert [r["loss"] for r in prox_mu.tables["rounds"]] != [r["loss"] for r in avg.tables["rounds"]]


def test_fedlwf_runs_and_distils_after_the_first_task(tmp_path):
    out = run("fedlwf", tmp_path, "methods.fedlwf.weight=5")
    assert len(out.tables["accuracy"]) == 6
    bytes_down = {r["task"]: r["bytes_down"] for r in out.tables["rounds"]}
    assert bytes_down[1] > bytes_down[0]  # the teacher travels from task 1 on


def _env(dim=4, k=3):
    return MethodEnv(
        aggregator=mean_aggregator(),
        feature_dim=dim,
        num_classes=k,
        class_names=("a", "b", "c"),
        dataset="x",
        run_seed=0,
        num_clients=2,
        train=TrainSettings(1, 8, "sgd", 0.1, 0.0, 0.0),
    )


def test_fedncm_means_equal_centralised_means():
    from baselines.fedncm import FedNCM, FedNCMConfig

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    server = FedNCM(FedNCMConfig(normalize=False), _env())
    server.setup()
    server.begin_task(TaskInfo(0, (0, 1, 2), (0, 1, 2), {0: (0, 1, 2), 1: (0, 1, 2)}))
    client = FedNCM.ClientClass(FedNCMConfig(normalize=False), _env())
    ctx = TrainContext(0, 0, 0, 0, _env().train)
    ups = [client.local_train(server.payload_for(k), ClientData(k, x[s], y[s]), ctx) for k, s in enumerate((slice(0, 11), slice(11, 30)))]
    server.aggregate(ups)
    for c in range(3):
        np.testing.assert_allclose(server.means[c], x[y == c].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(server.predict(server.means[:3].astype(np.float32)), [0, 1, 2])


def _moe(text_adapters=False):
    from baselines.moe_adapter import MoEAdapterConfig, MoEAdapterFL

    env = MethodEnv(
        aggregator=mean_aggregator(),
        feature_dim=0,
        num_classes=3,
        class_names=("cat", "dog", "car"),
        dataset="x",
        run_seed=0,
        num_clients=1,
        train=TrainSettings(1, 4, "sgd", 0.1, 0.0, 0.0),
    )
    cfg = MoEAdapterConfig(model="tiny-random", text_adapters=text_adapters)
    return MoEAdapterFL, cfg, env


def test_moe_adapter_zero_init_equals_plain_clip():
    from baselines.moe_adapter import CLIPClassifier, load_clip

    cls, cfg, env = _moe()
    plain, _ = load_clip(cfg, env.run_seed)
    adapted = CLIPClassifier(cfg, env, env.class_names)
    adapted.adapters.eval()
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        a = adapted.model.get_image_features(pixel_values=adapted.pixels(images))
        p = plain.get_image_features(pixel_values=adapted.pixels(images))
    a = a if isinstance(a, torch.Tensor) else a.pooler_output
    p = p if isinstance(p, torch.Tensor) else p.pooler_output
    torch.testing.assert_close(a, p)


def test_moe_adapter_trains_only_adapters_and_routers():
    cls, cfg, env = _moe()
    server = cls(cfg, env)
    server.setup()
    server.begin_task(TaskInfo(0, (0, 1, 2), (0, 1, 2), {0: (0, 1, 2)}))
    client = cls.ClientClass(cfg, env)
    rng = np.random.default_rng(0)
    data = ClientData(0, rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, 8))
    client.local_train(server.payload_for(0), data, TrainContext(0, 0, 0, 0, env.train))  # builds the client's model
    frozen_before = {k: v.clone() for k, v in client.clf.model.state_dict().items() if "adapter" not in k}
    upd = client.local_train(server.payload_for(0), data, TrainContext(0, 0, 1, 0, env.train))
    after = client.clf.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen_before.items())
    assert all(k.startswith("adapter.") for k in upd.arrays)
    moved = [k for k, v in upd.arrays.items() if not np.array_equal(v, server.payload_for(0).arrays[k])]
    assert any(".up." in k for k in moved) and any(".gate." in k for k in moved)
    assert server.trainable_params == sum(v.size for v in upd.arrays.values())


def test_moe_adapter_follows_upstream_defaults():
    from baselines.moe_adapter import MoEAdapterConfig

    cfg = MoEAdapterConfig()
    assert cfg.model == "openai/clip-vit-base-patch16" and cfg.text_adapters and cfg.routing == "image"
    assert (cfg.num_experts, cfg.top_k, cfg.bottleneck, cfg.scale) == (2, 2, 64, 0.1)
    cls, tiny, env = _moe()
    server = cls(MoEAdapterConfig(model="tiny-random"), env)
    server.setup()
    assert any(k.startswith("text") for k in server.clf.adapters) and any(k.startswith("vision") for k in server.clf.adapters)


def test_moe_adapter_routes_each_image_from_its_class_token_with_upstream_noise():
    from baselines.moe_adapter import NOISE_EPSILON, MoEAdapter, MoEAdapterConfig

    torch.manual_seed(0)
    ad = MoEAdapter(8, MoEAdapterConfig(model="tiny-random", top_k=1))
    torch.nn.init.normal_(ad.gate.weight)
    for e in ad.experts:
        torch.nn.init.normal_(e.up.weight)
    x = torch.randn(3, 5, 8)
    ad.eval()
    g = ad.gates(x)
    assert g.shape == (3, 2)  # one decision per image
    y = x.clone()
    y[:, 1:] = torch.randn(3, 4, 8)  # other tokens change, the class token does not
    torch.testing.assert_close(ad.gates(y), g)
    out = ad(x)
    chosen = g.argmax(1)
    for b in range(3):  # every token of an image goes through the image's expert
        torch.testing.assert_close(out[b], 0.1 * ad.experts[int(chosen[b])](x[b]))
    ad.train()
    ad.generator = torch.Generator().manual_seed(1)
    noisy = ad.gate(x[:, 0]) + torch.randn((3, 2), generator=torch.Generator().manual_seed(1)) * (math.log(2) + NOISE_EPSILON)
    top = noisy.topk(1, dim=-1).indices
    assert torch.equal(ad.gates(x).argmax(1, keepdim=True), top)  # noise std softplus(0) + 1e-2, as upstream


def test_moe_adapter_reads_the_residual_stream_before_the_mlp_norm():
    from baselines.moe_adapter import CLIPClassifier, MoEAdapterConfig, ParallelMLP, Tap

    cls, _, env = _moe()
    clf = CLIPClassifier(MoEAdapterConfig(model="tiny-random"), env, env.class_names)
    layer = clf.model.vision_model.encoder.layers[0]
    assert isinstance(layer.layer_norm2, Tap) and isinstance(layer.mlp, ParallelMLP)
    seen = {}
    layer.mlp.adapter.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    layer.layer_norm2.norm.register_forward_pre_hook(lambda m, args: seen.update(pre=args[0]))
    clf.model.get_image_features(pixel_values=clf.pixels(np.zeros((2, 32, 32, 3), np.uint8)))
    assert torch.equal(seen["x"], seen["pre"])  # the adapter's input is the norm's input, not its output
    normed = CLIPClassifier(MoEAdapterConfig(model="tiny-random", adapter_input="normed"), env, env.class_names)
    assert not isinstance(normed.model.vision_model.encoder.layers[0].layer_norm2, Tap)


def test_ddas_sends_out_of_distribution_images_to_the_frozen_clip():
    from baselines.moe_adapter import MoEAdapterConfig

    cls, _, env = _moe()
    cfg = MoEAdapterConfig(model="tiny-random", ddas=True, ddas_threshold=2.5)
    server = cls(cfg, env)
    server.setup()
    server.begin_task(TaskInfo(0, (0, 1, 2), (0, 1, 2), {0: (0, 1, 2)}))
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(1, 32, 32, 3))
    images = np.clip(base + rng.normal(0, 8, size=(48, 32, 32, 3)), 0, 255).astype(np.uint8)  # one narrow distribution
    data = ClientData(0, images, rng.integers(0, 3, 48))
    client = cls.ClientClass(cfg, env)
    settings = TrainSettings(20, 16, "sgd", 0.1, 0.0, 0.0)
    upd = client.local_train(server.payload_for(0), data, TrainContext(0, 0, 0, 0, settings))
    assert any(k.startswith("ddas.task0.") for k in upd.arrays)
    server.aggregate([upd])
    inside = server.clf.out_of_distribution(server.clf.frozen_features(images[:8]))
    far = (rng.integers(0, 2, size=(8, 32, 32, 3)) * 255).astype(np.uint8)  # black/white noise: far from the training images
    outside = server.clf.out_of_distribution(server.clf.frozen_features(far))
    assert not inside.any() and outside.all()
    pred = server.predict(far)
    zero_shot = np.asarray((0, 1, 2))[server.clf.zero_shot(server.clf.frozen_features(far), (0, 1, 2)).argmax(1).numpy()]
    assert np.array_equal(pred, zero_shot)  # the frozen CLIP answered them
    assert server.stats()["ddas_ood_share"] == 1.0
