"""Clients on a CUDA GPU. Skipped without CUDA (CI has none); run on a GPU machine with
`HF_HUB_OFFLINE=1 python -m pytest -q tests/runtime/test_device.py`."""

import numpy as np
import pytest
import torch

from bench.data import load_dataset
from bench.features import FeatureStore
from bench.loader import load_config
from bench.runner import RunSpec, execute_run
from bench.runtime import LocalExecutor
from bench.runtime.base import client_data, pick_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_pick_device():
    assert pick_device("auto", False) == "cpu" and pick_device("auto", True) == "cuda"
    assert pick_device("cpu", True) == "cpu" and pick_device("cuda", True) == "cuda"


def run(method, tmp_path, device):
    cfg = load_config("smoke", [f"runtime.device={device}"])
    ds = load_dataset(cfg.data, None)
    store = FeatureStore(ds, cfg.backbone, tmp_path)
    return execute_run(RunSpec(method, cfg), ds, store, LocalExecutor(cfg.runtime), str(tmp_path))


@cuda
@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fedlwf", "fedame", "moe_adapter"])
def test_clients_on_cuda_match_the_cpu(tmp_path, method):
    """Same seeds, same minibatch order (CPU generators): a GPU run lands where the CPU run
    does, up to floating-point differences between the devices' kernels."""
    cpu, gpu = run(method, tmp_path, "cpu"), run(method, tmp_path, "cuda")
    a = np.array([r["accuracy"] for r in cpu.tables["accuracy"]])
    b = np.array([r["accuracy"] for r in gpu.tables["accuracy"]])
    assert np.abs(a - b).max() <= 0.1, (a, b)
    assert gpu.summary["bytes_up"] == cpu.summary["bytes_up"]


@cuda
def test_client_data_stays_on_the_gpu():
    data = client_data(3, np.ones((4, 2), np.float32), np.arange(4), "cuda")
    assert data.x.is_cuda and isinstance(data.y, np.ndarray)
