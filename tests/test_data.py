import numpy as np
import pytest

from bench import data as data_mod
from bench.config import DataConfig
from bench.data import DataError, load_dataset

from .conftest import SHARED_DATA, requires_shared_data


def test_cifar10_loader_on_fixture(cifar_root):
    root = cifar_root("cifar10", per_class_train=2, per_class_test=3)
    ds = load_dataset(DataConfig(dataset="cifar10"), root)
    assert ds.train_x.shape == (5 * 2 * 10, 32, 32, 3) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (30, 32, 32, 3)
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10
    assert np.bincount(ds.train_y).tolist() == [10] * 10


def test_cifar100_loader_reads_superclasses(cifar_root):
    root = cifar_root("cifar100", per_class_train=2, per_class_test=1)
    ds = load_dataset(DataConfig(dataset="cifar100", max_train_per_class=1), root)
    assert ds.num_classes == 100 and len(ds.train_y) == 100  # capped to 1 per class
    assert ds.superclasses[:6] == (0, 0, 0, 0, 0, 1)
    assert ds.superclass_names[1] == "coarse1"


def test_loader_layout_matches_pixels(cifar_root, tmp_path):
    """The CHW -> HWC transpose is right: a red image stays red."""
    import pickle

    folder = tmp_path / "d" / "cifar-100-python"
    folder.mkdir(parents=True)
    img = np.zeros((3, 32, 32), dtype=np.uint8)
    img[0] = 255
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": img.reshape(1, -1), "fine_labels": [0], "coarse_labels": [0]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["apple"], "coarse_label_names": ["fruit"]}, f)
    ds = load_dataset(DataConfig(dataset="cifar100"), tmp_path / "d")
    assert ds.train_x[0, 5, 7].tolist() == [255, 0, 0]


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_DOWNLOAD_HOST", ("127.0.0.1", 9))  # nothing listens: refused at once
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(dataset="cifar100"), tmp_path / "nowhere")
    msg = str(e.value)
    assert "train" in msg and "cifar-100-python" in msg and "--data-dir" in msg


def test_synthetic_is_deterministic():
    a = load_dataset(DataConfig(dataset="synthetic"), None)
    b = load_dataset(DataConfig(dataset="synthetic"), None)
    assert np.array_equal(a.train_x, b.train_x) and a.digest("train") == b.digest("train")
    assert a.digest("train") != a.digest("test")


@pytest.mark.slow
@requires_shared_data()
def test_real_cifar100_loads():
    ds = load_dataset(DataConfig(dataset="cifar100"), SHARED_DATA)
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.train_y).tolist() == [500] * 100
    assert ds.class_names[:3] == ("apple", "aquarium_fish", "baby")
    assert len(set(ds.superclasses)) == 20


@pytest.mark.slow
@requires_shared_data()
def test_real_cifar100_run_with_shared_backbone(tmp_path):
    """A small real run: FedNCM and FedAvg on CIFAR-100 features of the shared B50 backbone."""
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.results import read_table

    weights = SHARED_DATA.parent / "weights" / "resnet18_cifar100_b50.pt"
    if not weights.exists():
        pytest.skip("../shared/weights absent")
    out = tmp_path / "r"
    res = CliRunner().invoke(app, [
        "run", "--config", "cifar100_local", "--methods", "fedncm,fedavg", "--out", str(out),
        "--data-dir", str(SHARED_DATA), "--set", f"backbone.weights={weights}",
        "--set", "data.max_train_per_class=100", "--set", "data.max_test_per_class=40",
        "--set", "training.rounds=2",
    ])
    assert res.exit_code == 0, res.output
    s = {r["method"]: r for r in read_table(out, "summary").to_pylist()}
    # 100 classes: chance is 1%; the backbone's frozen features make NCM far better than that
    assert s["fedncm"]["final_acc"] > 0.25
    assert s["fedavg"]["forgetting"] > s["fedncm"]["forgetting"]
