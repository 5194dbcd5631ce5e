"""MovieLens-100K: both on-disk layouts, the leave-one-out split, dropped users, a missing
folder, and the real files in ../shared/data/ml-100k."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.data import DataError
from bench.data.movielens import check_folder, load_movielens
from tests.conftest import SHARED_DATA
from tests.recommendation.world import interactions, write_grouplens, write_recbole


def test_both_layouts_give_the_same_dataset(tmp_path):
    rows, n_items = interactions()
    a = load_movielens(write_grouplens(tmp_path / "g" / "ml-100k", rows, n_items).parent)
    b = load_movielens(write_recbole(tmp_path / "r" / "ml-100k", rows, n_items).parent)
    for field in ("train_x", "train_y", "test_x", "test_y", "val_y"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.class_names == b.class_names and a.class_names[0] == "Movie 1 (1991): Action"
    assert len(a.class_names) == n_items and a.dropped == 0


def test_each_user_keeps_time_order_with_the_last_item_for_test_and_the_one_before_for_validation(tmp_path):
    rows, n_items = interactions()
    ds = load_movielens(write_recbole(tmp_path / "ml-100k", rows, n_items).parent)
    for user in (0, 1, 17):
        mine = [r for r in rows if r[0] == user + 1]  # file order
        ordered = sorted(range(len(mine)), key=lambda i: (mine[i][3], i))  # time, ties by file order
        items = [mine[i][1] - 1 for i in ordered]
        assert list(ds.train_y[ds.train_x[:, 0] == user]) == items[:-2]
        assert ds.val_y[user] == items[-2] and ds.test_y[user] == items[-1]
    tied = [r for r in rows if r[0] == 1 and r[3] == min(t for u, _, _, t in rows if u == 1)]
    assert len(tied) == 2  # user 1's first two interactions share a time: the file's order decides
    assert list(ds.train_y[ds.train_x[:, 0] == 0][:2]) == [tied[0][1] - 1, tied[1][1] - 1]


def test_users_with_fewer_than_three_interactions_are_dropped_and_counted(tmp_path):
    rows, n_items = interactions(users=10)
    rows = [r for r in rows if r[0] != 3] + [(3, 5, 4, 1), (3, 6, 4, 2)] + [(99, 7, 1, 5)]
    ds = load_movielens(write_recbole(tmp_path / "ml-100k", rows, n_items).parent)
    assert ds.dropped == 2 and len(ds.test_y) == 9


def test_a_missing_folder_is_one_error_line_that_says_where_to_download(tmp_path):
    with pytest.raises(DataError, match="files.grouplens.org"):
        load_movielens(tmp_path)
    res = CliRunner().invoke(
        app, ["run", "-c", "ml100k", "--methods", "popularity", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    )
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MovieLens-100K" in res.output, res.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet"))


def test_a_file_that_does_not_match_its_checksum_is_reported(tmp_path):
    rows, n_items = interactions()
    folder = write_recbole(tmp_path / "ml-100k", rows, n_items)
    (folder / "SHA256SUMS").write_text("0" * 64 + "  ml-100k.inter\n")
    ok, why = check_folder(tmp_path)
    assert not ok and "does not match its sha256" in why


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "ml-100k.inter").exists(), reason="../shared/data/ml-100k absent")
def test_the_real_files_have_943_users_and_1682_items_and_match_their_checksums():
    ok, why = check_folder(SHARED_DATA)
    assert ok, why
    ds = load_movielens(SHARED_DATA)
    assert len(ds.test_y) == 943 and len(ds.class_names) == 1682 and ds.dropped == 0
    assert len(ds.train_y) == 100_000 - 2 * 943
    assert ds.class_names[0] == "Toy Story (1995): Animation, Children's, Comedy"
