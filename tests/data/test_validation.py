"""The validation protocol: a seeded per-class slice held out of training, scored with
`eval.split: val`, recorded in the run id and the runs table."""

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.data import Dataset
from bench.data.base import DataError
from bench.data.validation import held_out, validation_indices, with_validation
from bench.results import read_table


def _ds(n_per_class=(10, 20, 3)):
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    x = np.arange(len(y), dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    return Dataset("toy", ("a", "b", "c"), x, y, x[:5].copy(), y[:5].copy())


def test_the_slice_is_per_class_seeded_and_leaves_every_class_in_training():
    ds = _ds()
    val = validation_indices(ds.train_y, 0.2, seed=0)
    assert [int((ds.train_y[val] == c).sum()) for c in range(3)] == [2, 4, 1]  # 20% of each class, at least one
    np.testing.assert_array_equal(val, validation_indices(ds.train_y, 0.2, seed=0))
    assert not np.array_equal(val, validation_indices(ds.train_y, 0.2, seed=1))
    assert len(validation_indices(np.array([0, 1, 1]), 0.5, 0)) == 1  # a class of one sample stays in training


def test_val_runs_train_without_the_slice_and_score_on_it():
    ds = _ds()
    feats = np.random.default_rng(0).normal(size=(len(ds.train_y), 4)).astype(np.float32)
    test_feats = np.zeros((5, 4), np.float32)
    val = validation_indices(ds.train_y, 0.2, 0)
    seen, tr, ev = with_validation(ds, feats, test_feats, 0.2, "val", 0)
    assert len(seen.train_y) == len(ds.train_y) - len(val) == len(tr)
    np.testing.assert_array_equal(ev, feats[val])  # scored on the held-out rows, aligned with their labels
    np.testing.assert_array_equal(seen.test_y, ds.train_y[val])
    assert not set(map(tuple, tr.tolist())) & set(map(tuple, ev.tolist()))  # no held-out row is trained on
    same, tr2, ev2 = with_validation(ds, feats, test_feats, 0.2, "test", 0)
    np.testing.assert_array_equal(tr2, tr)  # test runs train on the same samples as val runs
    assert ev2 is test_feats and same.test_y is ds.test_y
    untouched = held_out(ds, 0.0, "test", 0)
    assert untouched[0] is ds and untouched[1] is None
    with pytest.raises(DataError, match="data.val_fraction"):
        held_out(ds, 0.0, "val", 0)


def test_the_split_is_in_the_run_id_and_the_runs_table(tmp_path):
    runner = CliRunner()
    ids = {}
    for split in ("test", "val"):
        out = tmp_path / split
        res = runner.invoke(
            app, ["run", "-c", "smoke", "-m", "fedncm", "--out", str(out), "--set", "data.val_fraction=0.2", "--set", f"eval.split={split}"]
        )
        assert res.exit_code == 0, res.output
        (row,) = read_table(out, "runs").to_pylist()
        assert row["eval_split"] == split
        ids[split] = row["run_id"]
    assert ids["val"].split("-")[-2] == "val" and "-val-" not in ids["test"] and ids["val"] != ids["test"]
    bad = runner.invoke(app, ["run", "-c", "smoke", "-m", "fedncm", "--out", str(tmp_path / "x"), "--set", "eval.split=val"])
    assert bad.exit_code == 2 and "data.val_fraction" in bad.output
