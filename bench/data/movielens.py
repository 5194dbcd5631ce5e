"""MovieLens-100K as a sequential-recommendation dataset, with the leave-one-out split.

Read from GroupLens's own layout (`u.data`, `u.item`, as in their `ml-100k.zip`) or from
RecBole's atomic files (`ml-100k.inter`, `ml-100k.item`). Each user's interactions are
sorted by time (ties keep the file's order); the last is the user's test item, the one
before it the validation item, the rest are training interactions. Users with fewer than
three interactions cannot be split that way: they are dropped and counted.

The dataset is returned in the harness's array form (bench/data/base.py), items playing the
part of classes: `train_x` holds (user, item) rows in each user's time order and `train_y`
the item; `test_x` holds each user's index, `test_y` their test item and `val_y` their
validation item. Item ids and user ids are 0-based positions, in the order of the ids in
the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.data.base import DataError, Dataset
from bench.inputs import Input, sha256_of

log = logging.getLogger(__name__)

DOWNLOAD_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GENRES = (  # u.item's 19 genre flags, in column order
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir "
    "Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()


@dataclass(frozen=True)
class Catalogue:
    """Raw interactions (file ids) and each item's text (title, year and genres)."""

    users: np.ndarray  # file user id per interaction
    items: np.ndarray  # file item id per interaction
    times: np.ndarray  # timestamp per interaction
    item_ids: np.ndarray  # every item's file id, ascending
    item_texts: tuple[str, ...]  # aligned with item_ids


def find_layout(root: Path) -> tuple[str, Path]:
    """("recbole" | "grouplens", folder): `root` itself or its `ml-100k/` subfolder."""
    for folder in (root, root / "ml-100k"):
        if (folder / "ml-100k.inter").is_file() and (folder / "ml-100k.item").is_file():
            return "recbole", folder
        if (folder / "u.data").is_file() and (folder / "u.item").is_file():
            return "grouplens", folder
    raise DataError(
        f"no MovieLens-100K under {root} (looked for ml-100k/u.data + u.item, GroupLens's layout, or ml-100k.inter + "
        f"ml-100k.item, RecBole's): download and unzip {DOWNLOAD_URL} there, or point --data-dir at the folder that has them"
    )


def read_catalogue(root: Path) -> Catalogue:
    layout, folder = find_layout(root)
    return _read_recbole(folder) if layout == "recbole" else _read_grouplens(folder)


def _read_recbole(folder: Path) -> Catalogue:
    inter = np.loadtxt(folder / "ml-100k.inter", delimiter="\t", skiprows=1, dtype=np.int64, usecols=(0, 1, 3))
    ids, texts = [], []
    with open(folder / "ml-100k.item", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        col = {name.split(":")[0]: i for i, name in enumerate(header)}
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < len(header):
                parts += [""] * (len(header) - len(parts))
            ids.append(int(parts[col["item_id"]]))
            year = parts[col["release_year"]] if "release_year" in col else ""
            texts.append(item_text(parts[col["movie_title"]], year, parts[col["class"]].split()))
    return _catalogue(inter[:, 0], inter[:, 1], inter[:, 2], ids, texts)


def _read_grouplens(folder: Path) -> Catalogue:
    inter = np.loadtxt(folder / "u.data", dtype=np.int64, usecols=(0, 1, 3))
    ids, texts = [], []
    with open(folder / "u.item", encoding="latin-1") as f:
        for line in f:
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("|")
            title, date, flags = parts[1], parts[2], parts[5:24]
            year = date[-4:] if len(date) >= 4 else ""
            if title.endswith(")") and title[-6:-5] == "(":  # "Toy Story (1995)": the year is its own field here
                title = title[:-7]
            ids.append(int(parts[0]))
            texts.append(item_text(title, year, [g for g, on in zip(GENRES, flags) if on.strip() == "1"]))
    return _catalogue(inter[:, 0], inter[:, 1], inter[:, 2], ids, texts)


def item_text(title: str, year: str, genres: list[str]) -> str:
    """What the text features embed: "Toy Story (1995): Animation, Children's, Comedy"."""
    head = f"{title.strip()} ({year.strip()})" if year.strip() else title.strip()
    return f"{head}: {', '.join(genres)}" if genres else head


def _catalogue(users: np.ndarray, items: np.ndarray, times: np.ndarray, ids: list[int], texts: list[str]) -> Catalogue:
    order = np.argsort(ids, kind="stable")
    item_ids = np.asarray(ids, dtype=np.int64)[order]
    unknown = np.setdiff1d(items, item_ids)
    if unknown.size:
        raise DataError(
            f"MovieLens interactions name {unknown.size} item ids missing from the item file (e.g. {unknown[0]}); the download is incomplete"
        )
    return Catalogue(users, items, times, item_ids, tuple(texts[i] for i in order))


def leave_one_out(cat: Catalogue) -> Dataset:
    """The dataset in the harness's form; `dropped` counts the users with fewer than three
    interactions."""
    item_index = np.searchsorted(cat.item_ids, cat.items)
    user_ids, user_index = np.unique(cat.users, return_inverse=True)
    order = np.lexsort((np.arange(len(cat.users)), cat.times, user_index))  # by user, then time, then file order
    u, it = user_index[order], item_index[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]
    keep = (ends - starts) >= 3
    dropped = int((~keep).sum())
    train_rows, val_y, test_y = [], [], []
    for new_user, (s, e) in enumerate(zip(starts[keep], ends[keep])):
        train_rows.append(np.stack([np.full(e - s - 2, new_user), it[s : e - 2]], axis=1))
        val_y.append(it[e - 2])
        test_y.append(it[e - 1])
    n_users = len(val_y)
    train = np.concatenate(train_rows).astype(np.int64)
    ds = Dataset(
        name="ml100k",
        class_names=cat.item_texts,
        train_x=train,
        train_y=train[:, 1].copy(),
        test_x=np.arange(n_users, dtype=np.int64)[:, None],
        test_y=np.asarray(test_y, dtype=np.int64),
        val_y=np.asarray(val_y, dtype=np.int64),
        dropped=dropped,
    )
    if dropped:
        log.warning("MovieLens: %d of %d users have fewer than 3 interactions and were dropped", dropped, len(user_ids))
    return ds


def load_movielens(root: Path) -> Dataset:
    return leave_one_out(read_catalogue(root))


def check_folder(root: Path) -> tuple[bool, str]:
    """The folder as `fedame-bench prepare` checks it: a layout found, and the files' sha256
    equal to a SHA256SUMS beside them when there is one."""
    try:
        layout, folder = find_layout(root)
    except DataError as e:
        return False, str(e)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return True, f"{layout} layout (no SHA256SUMS to check against)"
    for line in sums.read_text().splitlines():
        digest, name = line.split()
        if sha256_of(folder / name) != digest:
            return False, f"{folder / name} does not match its sha256 in {sums}: download it again ({DOWNLOAD_URL})"
    return True, f"{layout} layout, sha256 sums match"


def movielens_input(root: Path) -> Input:
    return Input(
        "MovieLens-100K",
        root / "ml-100k" if (root / "ml-100k").is_dir() else root,
        check=lambda: check_folder(root),
        advice=f"download and unzip {DOWNLOAD_URL} into {root} (GroupLens's layout), or point --data-dir at a folder with RecBole's ml-100k atomic files",
    )
