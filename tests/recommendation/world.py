"""A small generated MovieLens-100K in both on-disk layouts (GroupLens's and RecBole's),
with sequential structure a model can learn: items form four cycles of forty, each user walks
one cycle from a seeded start, so the next item follows from the last one; popularity alone
cannot tell it (every item of a cycle is about as frequent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GENRES = ["Action", "Comedy", "Drama", "Horror"]


def interactions(users: int = 40, cycles: int = 4, cycle_len: int = 40, seed: int = 0) -> tuple[list[tuple[int, int, int, int]], int]:
    """(user, item, rating, timestamp) rows, 1-based ids as in the files, and the item count.
    The rows are shuffled (the loader must sort by time), and user 1 has two interactions at
    one timestamp (ties keep the file's order)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        c, start, n = u % cycles, int(rng.integers(cycle_len)), int(rng.integers(12, 20))
        t0 = 880000000 + int(rng.integers(1000))
        for step in range(n):
            t = t0 + 10 * (step - 1 if u == 1 and step == 1 else step)  # user 1: steps 0 and 1 at one time
            rows.append((u, c * cycle_len + (start + step) % cycle_len + 1, int(rng.integers(1, 6)), t))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], cycles * cycle_len


def titles(n_items: int) -> list[tuple[str, str, list[str]]]:
    return [(f"Movie {i}", str(1990 + i % 10), [GENRES[(i - 1) // 40 % len(GENRES)]]) for i in range(1, n_items + 1)]


def write_grouplens(folder: Path, rows, n_items: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    lines = []
    for i, (title, year, genres) in enumerate(titles(n_items), 1):
        flags = [
            "1" if g in genres else "0"
            for g in [
                "unknown",
                "Action",
                "Adventure",
                "Animation",
                "Children's",
                "Comedy",
                "Crime",
                "Documentary",
                "Drama",
                "Fantasy",
                "Film-Noir",
                "Horror",
                "Musical",
                "Mystery",
                "Romance",
                "Sci-Fi",
                "Thriller",
                "War",
                "Western",
            ]
        ]
        lines.append("|".join([str(i), f"{title} ({year})", f"01-Jan-{year}", "", "http://example.org", *flags]) + "\n")
    (folder / "u.item").write_text("".join(lines), encoding="latin-1")
    return folder


def write_recbole(folder: Path, rows, n_items: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float\n", *(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)]
    (folder / "ml-100k.inter").write_text("".join(inter))
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"]
    items += [f"{i}\t{title}\t{year}\t{' '.join(genres)}\n" for i, (title, year, genres) in enumerate(titles(n_items), 1)]
    (folder / "ml-100k.item").write_text("".join(items))
    return folder


def world(root: Path, layout: str = "recbole", **kw) -> Path:
    """The generated data under `root`/ml-100k in `layout`; returns `root` (the data dir)."""
    rows, n_items = interactions(**kw)
    (write_recbole if layout == "recbole" else write_grouplens)(root / "ml-100k", rows, n_items)
    return root


def rec_overrides(root: Path, *extra: str) -> list[str]:
    """The ml100k config shrunk to the generated world: every user a client, every round."""
    return [
        f"data.root={root}",
        "scenario.num_clients=40",
        "training.client_fraction=1.0",
        "training.rounds=6",
        "training.local_epochs=2",
        "training.lr=0.005",
        "eval.every=3",
        *extra,
    ]
