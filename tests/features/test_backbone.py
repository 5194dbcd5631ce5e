"""Backbone protocols: pretraining writes a loadable state dict; the probe measures features."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.config import BackboneConfig
from bench.features import load_backbone
from bench.features.protocols import linear_probe_accuracy, ncm_accuracy, parse_classes

runner = CliRunner()


def test_pretrain_one_epoch_writes_loadable_weights_and_json(tmp_path):
    out = tmp_path / "w" / "b.pt"
    res = runner.invoke(
        app,
        [
            "pretrain-backbone",
            "--config",
            "smoke",
            "--classes",
            "0-3",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--set",
            "backbone.variant=cifar",
        ],
    )
    assert res.exit_code == 0, res.output
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["classes"] == [0, 1, 2, 3] and info["epochs"] == 1 and 0 <= info["test_accuracy"] <= 1
    assert len(info["sha256"]) == 64 and info["train_data_digest"]
    model, digest = load_backbone(BackboneConfig(weights=str(out), variant="cifar"))
    assert digest == info["sha256"][:16]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def _blobs(rng, n_per, k, dim, spread):
    means = rng.normal(size=(k, dim)) * 5
    y = np.repeat(np.arange(k), n_per)
    return (means[y] + spread * rng.normal(size=(len(y), dim))).astype(np.float32), y


def test_probe_separated_means_is_high_random_labels_is_chance():
    rng = np.random.default_rng(0)
    xtr, ytr = _blobs(rng, 50, 5, 16, 1.0)
    xte, yte = _blobs(np.random.default_rng(0), 20, 5, 16, 1.0)  # same class means, new samples
    assert ncm_accuracy(xtr, ytr, xte, yte) > 0.95
    assert linear_probe_accuracy(xtr, ytr, xte, yte) > 0.95
    noise_tr, noise_te = rng.normal(size=(500, 16)), rng.normal(size=(200, 16))
    ytr_r, yte_r = rng.integers(0, 5, 500), rng.integers(0, 5, 200)
    assert abs(ncm_accuracy(noise_tr, ytr_r, noise_te, yte_r) - 0.2) < 0.1
    assert abs(linear_probe_accuracy(noise_tr, ytr_r, noise_te, yte_r) - 0.2) < 0.1


def test_probe_cli_writes_parquet(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "probe.parquet"
    res = runner.invoke(app, ["probe-backbone", "--config", "smoke", "--classes", "0-2", "--classes", "3-5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(out).to_pylist()
    assert [r["classes"] for r in rows] == ["0-2", "3-5"] and all(0 <= r["ncm"] <= 1 for r in rows)


def test_class_spec_parsing():
    assert parse_classes("0-2,5", 10) == [0, 1, 2, 5]
    from bench.features.protocols import ClassSpecError

    with pytest.raises(ClassSpecError, match="out of range"):
        parse_classes("0-20", 10)
