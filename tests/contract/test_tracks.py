"""The track seam (bench/tracks/): a new kind of experiment plugs in without an edit of the
runner, the sweep or the results; a method runs only the tracks it declares."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from bench import api
from bench.api import ServerHandle, TaskInfo
from bench.cli import app
from bench.tracks import Stage, Track, base


class AllAtOnce(Track):
    """A toy track: one stage holding every class, IID over the clients; it reports each
    client's sample count as a table and the last accuracy as a summary column."""

    name = "test_all_at_once"
    summary = "every class in one stage, IID (a test track)"
    extra_tables = {"client_samples": pa.schema([("client", pa.int64()), ("samples", pa.int64())])}
    summary_columns = (("last_acc", pa.float64()),)

    def __init__(self, cfg, ds, test_x) -> None:
        super().__init__(cfg, ds, test_x)
        rng = np.random.default_rng(cfg.seed)
        self.parts = tuple(np.sort(p) for p in np.array_split(rng.permutation(len(ds.train_y)), cfg.scenario.num_clients))

    @property
    def num_stages(self) -> int:
        return 1

    def stage(self, t: int) -> Stage:
        classes = tuple(range(self.ds.num_classes))
        held = {k: tuple(int(c) for c in np.unique(self.ds.train_y[ix])) for k, ix in enumerate(self.parts)}
        return Stage(TaskInfo(0, classes, classes, held), self.parts)

    def new_record(self) -> dict[str, Any]:
        return {}

    def evaluate(self, server: ServerHandle, t: int, kept: dict) -> tuple[float, Any]:
        acc = float(np.mean(server.predict(np.asarray(self.test_x)) == self.ds.test_y))
        return acc, None

    def end_stage(self, record, t, headline, details) -> None:
        record["last_acc"] = headline

    def summarize(self, record) -> dict[str, Any]:
        return {"last_acc": record["last_acc"]}

    def rows(self, record) -> dict[str, list[dict[str, Any]]]:
        return {"client_samples": [{"client": k, "samples": len(ix)} for k, ix in enumerate(self.parts)]}


@pytest.fixture
def toy_track():
    """The toy track, and FedNCM under another name declaring it, registered for one test."""
    from baselines.fedncm import FedNCM

    class ToyNCM(FedNCM):
        name = "toy_ncm"
        tracks = ("class_incremental", AllAtOnce.name)

    base.register_track(AllAtOnce)
    api.register(ToyNCM)
    yield
    base._TRACKS.pop(AllAtOnce.name)
    api._REGISTRY.pop(ToyNCM.name)


def test_a_new_track_runs_through_the_cli_with_its_own_tables(toy_track, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "-c", "smoke", "--methods", "all", "--out", str(out), "--set", f"track={AllAtOnce.name}"])
    assert res.exit_code == 0, res.output
    summary = pd.read_parquet(out / "summary")
    assert summary.method.tolist() == ["toy_ncm"]  # `all` means the methods of the config's track
    assert summary.num_tasks.tolist() == [1] and summary.last_acc.iloc[0] > 0.9  # NCM on separable classes, all at once
    assert summary.final_acc.isna().all()  # the class-incremental columns are the other track's
    samples = pd.read_parquet(out / "client_samples")
    assert samples.samples.sum() == 6 * 40 and len(samples) == 3  # every training sample, over the 3 clients
    rounds = pd.read_parquet(out / "rounds")
    assert (rounds.task == 0).all() and rounds.acc_seen.notna().all()
    assert not (out / "accuracy").exists()  # no class-incremental accuracy matrix for this track
    assert '"track": "test_all_at_once"' in pd.read_parquet(out / "runs").config.iloc[0]


def test_the_track_enters_the_run_id_only_when_it_is_not_the_default(toy_track):
    from bench.loader import load_config
    from bench.runner import RunSpec

    default = RunSpec("toy_ncm", load_config("smoke")).run_id
    assert RunSpec("toy_ncm", load_config("smoke", ["track=class_incremental"])).run_id == default
    assert RunSpec("toy_ncm", load_config("smoke", [f"track={AllAtOnce.name}"])).run_id != default


def test_a_method_that_does_not_run_the_track_is_one_error_line(toy_track, tmp_path):
    res = CliRunner().invoke(app, ["run", "-c", "smoke", "--methods", "fedavg", "--out", str(tmp_path), "--set", f"track={AllAtOnce.name}"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: fedavg does not run the test_all_at_once track (it runs class_incremental); `fedame-bench methods` lists the methods of each track"
    ]


def test_an_unknown_track_is_one_error_line(tmp_path):
    res = CliRunner().invoke(app, ["run", "-c", "smoke", "--methods", "fedavg", "--out", str(tmp_path), "--set", "track=nope"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: unknown track 'nope'; known tracks: class_incremental, personalized, sequential_rec")


def test_methods_lists_the_tracks_each_method_runs(toy_track):
    res = CliRunner().invoke(app, ["methods"])
    line = next(x for x in res.output.splitlines() if x.startswith("toy_ncm "))
    assert "class_incremental,test_all_at_once" in line.split()
    assert "class_incremental" in next(x for x in res.output.splitlines() if x.startswith("fedavg ")).split()
