"""`fedame-bench prepare` and the check before a run: every input of a sweep (the dataset, the
backbone weights, each method's own files), made where missing and checked where present.

On a machine without them a run stops before any work with one line naming what is missing
and the one command that makes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.api import get_method
from bench.config import ExperimentConfig
from bench.data import Dataset, load_dataset
from bench.data.datasets import dataset_input
from bench.errors import UserError
from bench.features.protocols import backbone_input
from bench.inputs import Input, InputError
from bench.loader import method_config


@dataclass
class PrepareJob:
    """The PrepareContext prepare hands to each maker: the dataset is loaded once, when first asked for."""

    config: ExperimentConfig
    data_dir: Path
    _dataset: Dataset | None = field(default=None, repr=False)

    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self.config.data, self.data_dir)
        return self._dataset


def config_inputs(cfg: ExperimentConfig, data_dir: Path, methods: list[str]) -> list[Input]:
    """Every input of a sweep: the dataset, the backbone weights, each method's own files."""
    found = [dataset_input(cfg.data, data_dir), backbone_input(cfg)]
    for name in methods:
        found += get_method(name).inputs(method_config(cfg, name))
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


def prepare_inputs(cfg: ExperimentConfig, data_dir: Path, methods: list[str], say: Callable[[str], None]) -> list[Outcome]:
    """Make what is missing, check what is there; one outcome per input, in order.

    The dataset comes first (the backbone and the anchors are made from it). An input that
    cannot be made (no network, no cached weights, no recipe) is a failed outcome with the
    reason; the others still run, so one prepare reports everything at once."""
    ctx = PrepareJob(cfg, data_dir)
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
