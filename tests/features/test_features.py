import json

import numpy as np
import pytest
import torch

from bench.config import BackboneConfig, DataConfig, SyntheticData
from bench.data import load_dataset
from bench.features import BackboneError, FeatureStore, load_backbone, preprocess, resnet18


@pytest.fixture
def tiny_ds():
    return load_dataset(DataConfig(dataset="synthetic", synthetic=SyntheticData(num_classes=3, train_per_class=5, test_per_class=2)), None)


def test_cache_round_trip_equals_direct_extraction(tiny_ds, tmp_path):
    cfg = BackboneConfig(batch_size=4)
    store = FeatureStore(tiny_ds, cfg, tmp_path)
    f = store.features("train")
    assert f.shape == (15, 512) and isinstance(f, np.memmap)
    model, _ = load_backbone(cfg)
    with torch.no_grad():
        direct = model(preprocess(tiny_ds.train_x, cfg, torch.device("cpu"))).numpy()
    np.testing.assert_allclose(f, direct, rtol=1e-4, atol=1e-5)
    # a second store hits the cache: no backbone is built
    again = FeatureStore(tiny_ds, cfg, tmp_path)
    np.testing.assert_array_equal(again.features("train"), f)
    assert again._model is None


def test_truncated_cache_is_detected_and_rebuilt(tiny_ds, tmp_path):
    cfg = BackboneConfig()
    store = FeatureStore(tiny_ds, cfg, tmp_path)
    good = np.array(store.features("train"))
    npy, meta = store.paths("train")
    with open(npy, "r+b") as fh:
        fh.truncate(npy.stat().st_size // 2)
    assert not store._valid(npy, meta)
    np.testing.assert_array_equal(FeatureStore(tiny_ds, cfg, tmp_path).features("train"), good)
    # corrupt bytes with the right size are caught by the checksum
    raw = bytearray(npy.read_bytes())
    raw[-5] ^= 0xFF
    npy.write_bytes(bytes(raw))
    assert json.loads(meta.read_text())["bytes"] == len(raw)
    np.testing.assert_array_equal(FeatureStore(tiny_ds, cfg, tmp_path).features("train"), good)


def test_cache_key_depends_on_weights_transform_and_variant(tiny_ds, tmp_path):
    base = FeatureStore(tiny_ds, BackboneConfig(), tmp_path).key("train")
    assert FeatureStore(tiny_ds, BackboneConfig(input_size=64), tmp_path).key("train") != base
    assert FeatureStore(tiny_ds, BackboneConfig(variant="cifar"), tmp_path).key("train") != base
    w = tmp_path / "w.pt"
    torch.save(resnet18("torchvision").state_dict(), w)
    k1 = FeatureStore(tiny_ds, BackboneConfig(weights=str(w)), tmp_path).key("train")
    sd = resnet18("torchvision").state_dict()
    sd["conv1.weight"] += 1
    torch.save(sd, w)
    k2 = FeatureStore(tiny_ds, BackboneConfig(weights=str(w)), tmp_path).key("train")
    assert len({base, k1, k2}) == 3


def test_state_dict_path_loads_and_wrong_variant_is_explained(tmp_path):
    w = tmp_path / "w.pt"
    torch.save(resnet18("torchvision", num_classes=50).state_dict(), w)  # fc of another size is dropped
    model, digest = load_backbone(BackboneConfig(weights=str(w)))
    assert len(digest) == 16
    with pytest.raises(BackboneError, match="variant"):
        load_backbone(BackboneConfig(weights=str(w), variant="cifar"))


def test_imagenet_offline_fails_fast_with_alternatives(tmp_path, monkeypatch):
    import socket
    import time

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    t0 = time.time()
    with pytest.raises(BackboneError) as e:
        load_backbone(BackboneConfig(weights="imagenet"))
    assert time.time() - t0 < 10
    assert "none" in str(e.value) and "TORCH_HOME" in str(e.value)


# ------------------------------------------------------------------ other backbones

from tests.conftest import write_tiny_hf_vision  # noqa: E402


@pytest.mark.parametrize("kind,dim", [("vit", 32), ("clip", 32), ("dinov2", 32)])
def test_hugging_face_backbones_build_a_feature_cache_and_a_run(tmp_path, kind, dim):
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.features.backbones import HFFeatures
    from bench.loader import load_config

    folder = write_tiny_hf_vision(tmp_path / kind, kind)
    cfg = load_config("smoke", [f"backbone.arch=hf:{folder}"])
    ds = load_dataset(cfg.data, None)
    store = FeatureStore(ds, cfg.backbone, tmp_path / "cache")
    assert store.cfg.input_size == 32  # from the model's own image processor
    if kind == "dinov2":
        assert store.cfg.mean == pytest.approx((0.485, 0.456, 0.406))
    feats = store.features("train")
    assert feats.shape == (len(ds.train_y), dim) and np.isfinite(feats).all() and feats.std() > 0
    assert store.paths("train")[0].exists()
    model, _ = load_backbone(cfg.backbone)
    assert isinstance(model, HFFeatures) and not any(p.requires_grad for p in model.parameters())
    res = CliRunner().invoke(
        app, ["run", "--config", "smoke", "--methods", "fedncm", "--set", f"backbone.arch=hf:{folder}", "--out", str(tmp_path / "out")]
    )
    assert res.exit_code == 0, res.output


def test_a_torchvision_model_by_name_drops_its_classifier(tmp_path):
    from bench.loader import load_config

    cfg = load_config("smoke", ["backbone.arch=mobilenet_v3_small", "backbone.weights=none"])
    model, digest = load_backbone(cfg.backbone)
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 1024) and digest == "random-init-seed0"  # the classifier's input, not 1000 logits
    ds = load_dataset(cfg.data, None)
    assert FeatureStore(ds, cfg.backbone, tmp_path).features("test").shape == (len(ds.test_y), 1024)


def test_unknown_or_unavailable_backbones_are_one_clear_error(tmp_path, monkeypatch):
    from bench.loader import load_config

    with pytest.raises(BackboneError, match="not a torchvision model"):
        load_backbone(load_config("smoke", ["backbone.arch=resnet_9000"]).backbone)
    from bench.hf import ModelUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match="not in the Hugging Face cache"):
        load_backbone(load_config("smoke", ["backbone.arch=hf:facebook/dinov2-small-not-cached"]).backbone)
