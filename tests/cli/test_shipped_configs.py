"""Every config the project ships loads, method sections validated, and says what it claims."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.api import get_method
from bench.loader import load_config, method_config

CONFIGS = sorted(p.stem for p in (Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_a_shipped_config_loads_with_every_method_of_its_sweep(name):
    cfg = load_config(name)
    for method in cfg.sweep.methods:
        method_config(cfg, method)


def test_the_cnn_config_puts_every_method_of_the_personalised_sweep_on_the_images():
    mlp, cnn = load_config("pfl_cifar100"), load_config("pfl_cifar100_cnn")
    assert cnn.sweep.methods == mlp.sweep.methods and len(cnn.sweep.methods) == 16
    for method in cnn.sweep.methods:
        assert method_config(mlp, method).model == "mlp"
        mc = method_config(cnn, method)
        assert mc.model == "cnn" and get_method(method).input_for(mc) == "images"
