import numpy as np
import pytest

from bench.config import DataConfig
from bench.data import DataError, load_dataset
from bench.data import datasets as data_mod
from tests.conftest import SHARED_DATA, requires_shared_data


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
    res = CliRunner().invoke(
        app,
        [
            "run",
            "--config",
            "cifar100_local",
            "--methods",
            "fedncm,fedavg",
            "--out",
            str(out),
            "--data-dir",
            str(SHARED_DATA),
            "--set",
            f"backbone.weights={weights}",
            "--set",
            "data.max_train_per_class=100",
            "--set",
            "data.max_test_per_class=40",
            "--set",
            "training.rounds=2",
        ],
    )
    assert res.exit_code == 0, res.output
    s = {r["method"]: r for r in read_table(out, "summary").to_pylist()}
    # 100 classes: chance is 1%; the backbone's frozen features make NCM far better than that
    assert s["fedncm"]["final_acc"] > 0.25
    assert s["fedavg"]["forgetting"] > s["fedncm"]["forgetting"]


# ------------------------------------------------------------------ image folders

from tests.conftest import write_image_folder  # noqa: E402


def _folder_cfg(root, *extra):
    from bench.loader import load_config

    return load_config("smoke", ["data.dataset=imagefolder", f"data.root={root}", *extra])


def test_imagefolder_train_test_layout(tmp_path):
    root = write_image_folder(tmp_path / "f", "split")
    ds = load_dataset(_folder_cfg(root, "data.image_size=32").data, root)
    assert ds.class_names == tuple(f"class_{c}" for c in range(6))
    assert ds.train_x.shape == (72, 32, 32, 3) and ds.test_x.shape == (24, 32, 32, 3)
    assert list(np.bincount(ds.train_y)) == [12] * 6 and list(np.bincount(ds.test_y)) == [4] * 6
    own = load_dataset(_folder_cfg(root).data, root)  # no image_size: the images' own 40 px
    assert own.train_x.shape[1:] == (40, 40, 3)


def test_imagefolder_single_pool_is_split_per_class_deterministically(tmp_path):
    root = write_image_folder(tmp_path / "p", "pool", train=8, test=2)
    a = load_dataset(_folder_cfg(root, "data.test_fraction=0.25").data, root)
    b = load_dataset(_folder_cfg(root, "data.test_fraction=0.25").data, root)
    assert list(np.bincount(a.test_y)) == [round(0.25 * 10)] * 6 and len(a.train_y) == 60 - len(a.test_y)
    assert np.array_equal(a.test_x, b.test_x) and a.digest("train") == b.digest("train")


def test_tiny_imagenet_layout_with_val_annotations_and_words(tmp_path):
    root = write_image_folder(tmp_path / "tiny-imagenet-200", "tiny", train=5, test=3, size=64)
    ds = load_dataset(_folder_cfg(root).data, root)
    assert ds.class_names[0] == "thing 0"  # from words.txt, first name
    assert ds.train_x.shape == (30, 64, 64, 3) and list(np.bincount(ds.test_y)) == [3] * 6
    # the val images are labelled by the annotations: each test image matches its class's pattern
    means = np.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(6)])
    nearest = ((ds.test_x[:, None].astype(float) - means[None]) ** 2).sum((2, 3, 4)).argmin(1)
    assert np.array_equal(nearest, ds.test_y)


def test_imagefolder_errors_say_what_to_do(tmp_path):
    root = write_image_folder(tmp_path / "f", "split")
    from PIL import Image

    Image.new("RGB", (20, 30)).save(root / "train" / "class_0" / "odd.png")
    with pytest.raises(DataError, match="set data.image_size"):
        load_dataset(_folder_cfg(root).data, root)
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset(_folder_cfg(tmp_path / "absent").data, tmp_path / "absent")
