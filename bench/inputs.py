"""An input: a file a config reads that a fresh machine may lack, with how to check it and how
to make it (bench.prepare runs these).

A config names its inputs by path (the dataset folder, a backbone state dict, a method's own
files). Each is checked against a recorded checksum (torchvision's md5 sums for CIFAR, the
sha256 in a backbone's JSON, a `.sha256` file beside anything else prepare wrote), so a
truncated download or a stale file is found once, not mid-sweep.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bench.errors import UserError

if TYPE_CHECKING:
    from bench.config import ExperimentConfig
    from bench.data.base import Dataset


class InputError(UserError, RuntimeError):
    """An input is missing or does not match its checksum; the message says what to run."""


class PrepareContext(Protocol):
    """What a maker may need: the config, the data folder, the dataset (loaded once, lazily;
    bench.prepare.PrepareJob is the one in use)."""

    config: ExperimentConfig
    data_dir: Path

    def dataset(self) -> Dataset: ...


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
