"""Each bad input: one clear error line, exit code 2, nothing written."""

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.data import datasets as data_mod

runner = CliRunner()


def fails(tmp_path, *args, match: str):
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert match in res.output.replace("\n", " "), res.output
    assert not list(out.rglob("*.parquet")) if out.exists() else True
    return res.output


def test_unknown_method_lists_known(tmp_path):
    fails(tmp_path, "--config", "smoke", "--methods", "fedavg,nope", match="known methods: ")


def test_alpha_not_positive(tmp_path):
    fails(tmp_path, "--config", "smoke", "--alpha", "0,0.5", match="must be > 0")
    fails(tmp_path, "--config", "smoke", "--set", "scenario.alpha=-1", match="alpha must be > 0")


def test_task_split_not_covering_classes(tmp_path):
    fails(tmp_path, "--config", "smoke", "--set", "scenario.tasks=[2,2]", match="covers 4 classes")


def test_more_clients_than_samples(tmp_path):
    fails(tmp_path, "--config", "smoke", "--set", "scenario.num_clients=500", match="fewer than needed")


def test_a_dirichlet_split_that_cannot_be_had_fails_in_seconds(tmp_path):
    """As many clients as samples: feasible by count, never drawn; the attempts shrink with the
    clients, so the error comes in seconds (it took minutes for 10,000 clients)."""
    import time

    t0 = time.monotonic()
    fails(
        tmp_path,
        "--config",
        "smoke",
        "--set",
        "data.synthetic.train_per_class=2000",
        "--set",
        "scenario.num_clients=4000",
        "--set",
        "scenario.min_samples=1",
        match="could not give each of 4000 clients",
    )
    assert time.monotonic() - t0 < 60


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(app, ["run", "--config", "smoke", "--out", str(blocker / "sub")])
    assert res.exit_code == 2 and "not writable" in res.output


def test_missing_data(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_DOWNLOAD_HOST", ("127.0.0.1", 9))
    fails(tmp_path, "--config", "cifar100", "--methods", "fedavg", "--data-dir", str(tmp_path / "empty"), match="cifar-100-python")


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    fails(tmp_path, "--config", str(bad), match="malformed config file")


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.roundz=3", "training.roundz"),
        ("training.rounds=abc", "training.rounds"),
        ("methods.fedprox.muu=1", "methods.fedprox.muu"),
    ],
)
def test_unknown_key_or_wrong_type_names_the_key(tmp_path, override, key):
    fails(tmp_path, "--config", "smoke", "--set", override, match=key)


def test_cuda_requested_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails(tmp_path, "--config", "smoke", "--set", "runtime.device=cuda", match="runtime.device=auto or cpu")
    fails(tmp_path, "--config", "smoke", "--executor", "ray", "--set", "runtime.device=cuda", match="--gpus-per-client")


def test_unreachable_ray_address_fails_fast_naming_it(tmp_path):
    import time

    t0 = time.perf_counter()
    fails(tmp_path, "--config", "smoke", "--executor", "ray", "--address", "127.0.0.1:1", match="no Ray cluster answers at 127.0.0.1:1")
    assert time.perf_counter() - t0 < 10  # Ray alone retries for minutes
    fails(tmp_path, "--config", "smoke", "--executor", "ray", "--address", "head-node", match="is not HOST:PORT")


def test_relative_paths_name_the_folder_they_resolved_against(tmp_path, monkeypatch):
    """Config paths resolve against the current directory: run elsewhere, the error says so."""
    monkeypatch.setattr(data_mod, "_DOWNLOAD_HOST", ("127.0.0.1", 9))
    monkeypatch.chdir(tmp_path)
    out = fails(tmp_path, "--config", "cifar100", "--methods", "fedavg", "--data-dir", "nowhere", match="current directory")
    assert str(tmp_path) in out.replace("\n", "")


@pytest.mark.parametrize(
    "args, match",
    [
        (["--alpha", "nan"], "--alpha values must be finite"),
        (["--alpha", "0.5,inf"], "--alpha values must be finite"),
        (["--set", "scenario.alpha=.nan"], "scenario.alpha: Input should be a finite number"),
        (["--set", "training.lr=.inf"], "training.lr: Input should be a finite number"),
        (["--set", "methods.fedame.lambdas.forget=.nan", "--methods", "fedame"], "methods.fedame.lambdas.forget"),
        (["--set", "aggregation.trim=.nan"], "aggregation.trim"),
    ],
)
def test_nan_and_infinite_numbers_are_refused(tmp_path, args, match):
    fails(tmp_path, "--config", "smoke", *args, match=match)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--seeds", "0,0"], "--seeds lists 0 more than once"),
        (["--alpha", "0.5,0.50"], "--alpha lists 0.5 more than once"),
        (["--methods", "fedavg,fedncm,fedavg"], "--methods lists fedavg more than once"),
        (["--set", "sweep.seeds=[1,1]"], "sweep.seeds lists a value twice"),
    ],
)
def test_a_grid_value_given_twice_is_one_error_not_two_runs_of_one_id(tmp_path, args, match):
    fails(tmp_path, "--config", "smoke", *args, match=match)


def test_ctrl_c_exits_130_even_after_native_code_saw_the_interrupt(tmp_path):
    """CPython remembers when a PyRun_* evaluation ended in a KeyboardInterrupt (native code
    evaluates Python that way), even if the interrupt was caught further up, and under
    `python -m` it then kills itself with SIGINT at exit. Here that
    evaluation is made on purpose, then the command is interrupted: `python -m` must still
    exit 130, not die by the signal (-2)."""
    import subprocess
    import sys

    (tmp_path / "interrupted_cli.py").write_text(
        "import ctypes\n"
        "import bench.cli as cli\n"
        "def interrupted():  # a command interrupted while native code evaluates Python\n"
        "    ctypes.pythonapi.PyRun_SimpleString(b'raise KeyboardInterrupt')  # sets the flag (prints a traceback)\n"
        "    raise KeyboardInterrupt\n"
        "cli.app = interrupted\n"
        "cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-m", "interrupted_cli"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert "interrupted" in proc.stdout + proc.stderr
