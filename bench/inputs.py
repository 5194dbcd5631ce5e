"""The files a config reads that a fresh machine may lack, and `fedame-bench prepare`, which makes them.

A config names its inputs by path (the dataset folder, a backbone state dict, a method's own
files such as FedAME's anchors). On a machine without them the run stops before any work
with one line naming what is missing and the one command that makes it; `prepare` then
makes each input that is missing and checks each one that is there against its recorded
checksum (torchvision's md5 sums for CIFAR, the sha256 in a backbone's JSON, a `.sha256`
file beside anything else prepare wrote), so a truncated download or a stale file is found
once, not mid-sweep.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from bench.errors import UserError

if TYPE_CHECKING:
    from bench.config import ExperimentConfig
    from bench.data.datasets import Dataset


class InputError(UserError, RuntimeError):
    """An input is missing or does not match its checksum; the message says what to run."""


@dataclass
class PrepareContext:
    """What a maker may need: the config, the data folder, the dataset (loaded once, lazily)."""

    config: ExperimentConfig
    data_dir: Path
    _dataset: Dataset | None = field(default=None, repr=False)

    def dataset(self) -> Dataset:
        if self._dataset is None:
            from bench.data import load_dataset

            self._dataset = load_dataset(self.config.data, self.data_dir)
        return self._dataset


@dataclass(frozen=True)
class Input:
    """One file or folder a run reads."""

    what: str  # for messages: "CIFAR-100 (torchvision's files)"
    path: Path
    #: the input as it is on disk: (True, "sha256 matches") or (False, what is wrong and what to do)
    check: Callable[[], tuple[bool, str]]
    #: makes the input at `path`; None where this harness cannot (the message says what to do)
    make: Callable[[PrepareContext], None] | None = None
    #: how long making it takes, for the missing-input line ("downloads 161 MB")
    cost: str = ""
    #: a run fetches this one itself when it is missing and a network is there (a dataset)
    fetched_by_run: bool = False
    #: what to do when it cannot be made here
    advice: str = ""

    def exists(self) -> bool:
        return self.path.exists()


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_sidecar(path: Path) -> None:
    """Record the sha256 of a file prepare made, for the next prepare's check."""
    sidecar(path).write_text(f"{sha256_of(path)}  {path.name}\n")


def check_sidecar(path: Path) -> tuple[bool, str]:
    """Compare a file with the `.sha256` beside it; no sidecar is no recorded checksum (said, not an error)."""
    side = sidecar(path)
    if not side.exists():
        return True, "no checksum recorded"
    if side.read_text().split()[0] != sha256_of(path):
        return False, f"{path} does not match its recorded sha256 ({side}); delete both and run prepare again"
    return True, "sha256 matches"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file beside `path`, so an interrupted prepare leaves nothing half-made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def config_inputs(cfg: ExperimentConfig, data_dir: Path, methods: list[str]) -> list[Input]:
    """Every input of a sweep: the dataset, the backbone weights, each method's own files."""
    from bench.api import get_method
    from bench.data.datasets import dataset_input
    from bench.features.protocols import backbone_input

    found = [dataset_input(cfg.data, data_dir), backbone_input(cfg)]
    for name in methods:
        found += get_method(name).inputs(cfg.method_config(name))
    seen: set[Path] = set()
    out = []
    for item in found:
        if item is not None and item.path not in seen:
            seen.add(item.path)
            out.append(item)
    return out


def prepare_hint(config: str, data_dir: str | None, overrides: list[str]) -> str:
    """The prepare command for the inputs of the run that was asked for (same data folder and --set)."""
    sets = "".join(f" --set {o}" for o in overrides if o.split("=", 1)[0].startswith(("data.", "backbone.", "methods.", "prepare.")))
    return f"fedame-bench prepare -c {config}" + (f" --data-dir {data_dir}" if data_dir else "") + sets


def require_inputs(cfg: ExperimentConfig, data_dir: Path, methods: list[str], hint: str) -> None:
    """Stop a run, before it writes anything, when inputs it cannot fetch itself are missing.

    A dataset alone missing is left to the run (it downloads where a network is, or says
    where to put the files); anything else missing is one line listing every missing input
    and the command that makes them."""
    missing = [i for i in config_inputs(cfg, data_dir, methods) if not i.exists()]
    if not any(not i.fetched_by_run for i in missing):
        return
    listed = "; ".join(f"{i.what} at {i.path}" for i in missing)
    costs = ", ".join(i.cost for i in missing if i.make is not None and i.cost)
    raise InputError(
        f"{cfg.name} reads files that are not here: {listed}. `{hint}` makes them"
        + (f" ({costs})" if costs else "")
        + ", or point the config at copies with --data-dir / --set"
    )


Status = Literal["present", "made", "failed"]


@dataclass(frozen=True)
class Outcome:
    input: Input
    status: Status
    detail: str


def prepare_inputs(
    cfg: ExperimentConfig, data_dir: Path, methods: list[str], say: Callable[[str], None]
) -> list[Outcome]:
    """Make what is missing, check what is there; one outcome per input, in order.

    The dataset comes first (the backbone and the anchors are made from it). An input that
    cannot be made (no network, no cached weights, no recipe) is a failed outcome with the
    reason; the others still run, so one prepare reports everything at once."""
    ctx = PrepareContext(cfg, data_dir)
    outcomes = []
    for item in config_inputs(cfg, data_dir, methods):
        if item.exists():
            ok, detail = item.check()
            outcomes.append(Outcome(item, "present" if ok else "failed", detail))
        elif item.make is None:
            outcomes.append(Outcome(item, "failed", item.advice or "cannot be made here"))
        else:
            say(f"making {item.what} at {item.path}" + (f" ({item.cost})" if item.cost else ""))
            try:
                item.make(ctx)
            except UserError as e:
                outcomes.append(Outcome(item, "failed", str(e)))
                continue
            ok, detail = item.check()
            outcomes.append(Outcome(item, "made" if ok else "failed", detail))
        say(f"{item.what}: {outcomes[-1].status} ({outcomes[-1].detail})")
    return outcomes
