"""Experiment configuration: pydantic models, YAML reading, `--set` overrides.

Every section forbids unknown keys, so a typo is an error naming the key rather than a
silently ignored setting. Method hyperparameters live in `methods.<name>`; this module keeps
them as plain mappings and knows no method: bench.loader validates each against its
method's own model (bench.api.Server.Config), asking the registry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bench.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError, ValueError):
    """A config the user wrote is wrong; the message says which key and what to do."""


class Section(BaseModel):
    """Unknown keys are errors, and so are NaN and infinite floats (no setting means them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MethodConfig(Section):
    """Base of every method's hyperparameter section (bench.api.Server.Config)."""


class SyntheticData(Section):
    num_classes: int = Field(10, ge=2)
    train_per_class: int = Field(60, ge=1)
    test_per_class: int = Field(20, ge=1)
    image_size: int = Field(32, ge=8)


class DataConfig(Section):
    # imagefolder: any ROOT/<class>/<image> folder, ROOT/train + ROOT/test, or Tiny-ImageNet (bench/data/imagefolder.py)
    # ml100k: MovieLens-100K for sequential recommendation (bench/data/movielens.py; track sequential_rec)
    dataset: Literal["cifar10", "cifar100", "synthetic", "imagefolder", "ml100k"] = "cifar10"
    root: str | None = None  # data dir; --data-dir and FEDAME_DATA_DIR override
    image_size: int | None = Field(None, ge=8)  # imagefolder: resize to this square (None: the images' own size)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # imagefolder with one pool of class folders: the test share
    domains: bool = False  # imagefolder: ROOT/<domain>/... holds one folder per domain (DomainNet, Digit-5 layouts)
    max_train_per_class: int | None = Field(None, ge=1)
    max_test_per_class: int | None = Field(None, ge=1)
    # a seeded per-class share of the training data held out of training: the validation
    # split every choice of a default is made on (bench/data/validation.py; 0: none)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    synthetic: SyntheticData = SyntheticData()


class AttackConfig(Section):
    """Malicious clients (bench/federation/attacks.py): which, and what they do."""

    kind: Literal["none", "random", "sign_flip", "scale", "label_flip", "free_rider"] = "none"
    clients: int = Field(1, ge=0)  # how many clients are malicious (a seeded choice, fixed per run)
    fraction: float | None = Field(None, gt=0, le=1)  # or this share of the clients (at least one)
    factor: float = Field(4.0, ge=0)  # sign_flip: g - factor * (u - g); scale: g + factor * (u - g)
    noise: float = Field(1.0, gt=0)  # random: std of the noise, relative to the global array's RMS


class AggregationConfig(Section):
    """How the server combines parameter updates (bench/federation/aggregation.py)."""

    rule: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "attention"] = "mean"
    trim: float = Field(0.2, ge=0, lt=0.5)  # trimmed_mean: share cut at each end, per coordinate
    byzantine: int = Field(1, ge=0)  # krum, multi_krum: malicious clients assumed (f)
    keep: int | None = Field(None, ge=1)  # multi_krum: updates averaged (default n - f)
    temperature: float = Field(0.1, gt=0)  # attention: softmax temperature
    sketch_dim: int = Field(256, ge=8)  # attention: width of the seeded random projection


class ScenarioConfig(Section):
    class_order: list[str | int] | None = None  # explicit order (names or label ids)
    shuffle_classes: bool = False  # seeded permutation when no explicit order
    tasks: list[int] | None = None  # explicit task sizes, e.g. [4, 4, 2]
    n_tasks: int | None = Field(None, ge=1)  # or this many equal parts
    num_clients: int = Field(5, ge=1)
    # NIID-Bench's splits (bench/data/partitions.py): label skew (dirichlet), #C=k label
    # quantity (label_quantity), quantity skew (quantity: sizes ~ Dir(alpha)), iid, shards
    partition: Literal["dirichlet", "iid", "shards", "label_quantity", "quantity"] = "dirichlet"
    alpha: float = 0.5
    min_samples: int = Field(2, ge=0)  # per client per task (dirichlet, quantity)
    shards_per_client: int = Field(2, ge=1)
    classes_per_client: int = Field(2, ge=1)  # label_quantity: k classes of each task per client
    # feature-noise skew: client k's inputs get Gaussian noise of std feature_noise * k / (clients - 1)
    feature_noise: float = Field(0.0, ge=0)
    # classes: class-incremental tasks; domain: one task per domain of the data (data.domains), all classes in each
    tasks_by: Literal["classes", "domain"] = "classes"
    domain_order: list[str] | None = None  # tasks_by=domain: the domains in task order (default: sorted names)
    # track personalized (bench/tracks/personalized.py): each client's seeded validation share
    # of its training data; clients held out of training that join at the end; a long-tailed
    # training set (largest class / smallest class, 1: as the dataset has it)
    client_val_fraction: float = Field(0.15, gt=0, lt=1)
    new_clients: int = Field(0, ge=0)
    imbalance: float = Field(1.0, ge=1)
    attack: AttackConfig = AttackConfig()

    @model_validator(mode="after")
    def _check(self) -> ScenarioConfig:
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha}); use e.g. 0.1 for skewed, 100 for near-IID")
        if self.tasks is not None and any(t < 1 for t in self.tasks):
            raise ValueError(f"task sizes must be positive, got {self.tasks}")
        if self.tasks is not None and self.n_tasks is not None:
            raise ValueError("give either scenario.tasks or scenario.n_tasks, not both")
        if self.tasks_by == "domain" and (self.tasks is not None or self.n_tasks is not None):
            raise ValueError("scenario.tasks_by=domain makes one task per domain: set scenario.tasks and n_tasks to null")
        if self.new_clients >= self.num_clients:
            raise ValueError(f"new_clients ({self.new_clients}) must leave clients to train: set it below num_clients ({self.num_clients})")
        if self.attack.kind != "none" and self.attack.fraction is None and not 1 <= self.attack.clients <= self.num_clients:
            raise ValueError(f"attack.clients must be 1..{self.num_clients} (the clients), got {self.attack.clients}")
        return self


class BackboneConfig(Section):
    # resnet18, any torchvision classification model by name (resnet50, vit_b_16, ...), or
    # hf:<model id or folder> (CLIP vision tower, ViT, DINOv2, ...): bench/features/backbones.py
    arch: str = "resnet18"
    variant: Literal["torchvision", "cifar"] = "torchvision"
    weights: str = "none"  # imagenet | none | <path to a state dict>
    input_size: int = Field(32, ge=8)
    mean: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
    std: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
    batch_size: int = Field(256, ge=1)
    device: str = "auto"


class TrainingConfig(Section):
    rounds: int = Field(100, ge=1)  # per task
    local_epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    client_fraction: float = Field(1.0, gt=0, le=1)


class EvalConfig(Section):
    every: int = Field(1, ge=0)  # rounds between evaluations; 0 = only at the end of each task
    # what a run is scored on: the test split (reported tables) or the validation slice
    # (data.val_fraction; what `fedame-bench tune` chooses on)
    split: Literal["test", "val"] = "test"


class RuntimeConfig(Section):
    executor: Literal["local", "ray", "auto"] = "local"
    # where clients train: auto = a CUDA GPU when the worker has one (a Ray actor: when it
    # was granted a GPU fraction), else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    address: str | None = None
    gpus_per_client: float = Field(0.0, ge=0)
    cpus_per_client: float = Field(1.0, ge=0)
    num_actors: int | None = Field(None, ge=1)
    max_concurrent_runs: int | None = Field(None, ge=1)
    max_retries: int = Field(2, ge=0)
    # torch (and numpy BLAS) threads for training, aggregation and evaluation in every worker
    # (the local process, each client actor, the central actor). Thread counts change float summation order, so only
    # with one value everywhere do the executors give bit-identical numbers; None: the local
    # process keeps torch's default (all cores), a client actor uses floor(cpus_per_client)
    torch_threads: int | None = Field(None, ge=1)
    # train a worker's sampled clients of a round together, as one stacked computation, where
    # the method can (`batched = True` on its client: heads on frozen features); same data, minibatch
    # order and seeds as one by one, numbers equal to float rounding (so a run of its own)
    batch_clients: bool = False


class SweepConfig(Section):
    """The default grid; the CLI's --methods/--alpha/--seeds replace these. Unset alpha and
    seeds mean the single scenario.alpha and seed."""

    methods: list[str] = []  # empty: --methods must name them
    alpha: list[float] | None = None
    seeds: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        for what, vals in (("methods", self.methods), ("alpha", self.alpha or []), ("seeds", self.seeds or [])):
            if len(set(vals)) != len(vals):
                raise ValueError(f"sweep.{what} lists a value twice ({vals}); each run of the grid must be distinct")
        if any(a <= 0 for a in self.alpha or []):
            raise ValueError(f"sweep.alpha values must be > 0, got {self.alpha}")
        return self


class BackboneRecipe(Section):
    """How `fedame-bench prepare` trains backbone.weights when the file is missing
    (`fedame-bench pretrain-backbone` with these arguments)."""

    classes: str = "0-49"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    max_lr: float = Field(0.2, gt=0)
    seed: int = 0
    cost: str = ""  # measured time, said before training starts (e.g. "about 40 min on 2 CPU cores")


class PrepareConfig(Section):
    """How to make this config's inputs on a machine without them (bench/inputs.py); not part of a run's id."""

    backbone: BackboneRecipe | None = None


class ExperimentConfig(Section):
    name: str = "experiment"
    seed: int = 0
    track: str = "class_incremental"  # the kind of experiment (bench/tracks/); its scenario and evaluation
    data: DataConfig = DataConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    backbone: BackboneConfig = BackboneConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    sweep: SweepConfig = SweepConfig()
    aggregation: AggregationConfig = AggregationConfig()
    prepare: PrepareConfig = PrepareConfig()
    cache_dir: str | None = None  # features/anchors/LLM cache; default per-user cache dir
    methods: dict[str, dict[str, Any]] = {}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def format_validation(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        loc = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/default.yaml for the keys)"
        parts.append(f"{loc or '<root>'}: {msg}")
    return "config error: " + "; ".join(parts)


def where(path: str | Path) -> str:
    """A path for an error message: a relative one says what it was resolved against."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    return f"{p} (relative paths resolve against the current directory {Path.cwd()}; run from the repository root or give an absolute path)"


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, or a bare name looked up in ./configs and the project's configs/."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    for base in (Path("configs"), CONFIG_DIR):
        cand = base / f"{name_or_path}.yaml"
        if cand.exists():
            return cand
    raise ConfigError(f"no config named {name_or_path!r} (looked in ./configs and {CONFIG_DIR})")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return raw


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_extends(raw: dict[str, Any], path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """`extends: NAME` loads another config (a name in configs/ or a path) beneath this one."""
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    candidate = path.parent / parent if str(parent).endswith((".yaml", ".yml")) else None
    ppath = candidate if candidate and candidate.exists() else resolve_config_path(str(parent))
    if ppath.resolve() in seen:
        raise ConfigError(f"config {path}: 'extends' forms a cycle through {ppath}")
    try:
        base = yaml.safe_load(ppath.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed config file {ppath}: {str(e).splitlines()[0]}") from None
    return _deep_merge(_resolve_extends(base, ppath, (*seen, ppath.resolve())), raw)


def read_config(path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or defaults), apply --set overrides, validate the harness's sections
    (method sections: bench.loader.load_config)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"malformed config file {p}: {str(e).splitlines()[0]}; fix the YAML syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"malformed config file {p}: the top level must be a mapping of sections")
        raw = _resolve_extends(raw, p, seen=(p.resolve(),))
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation(e)) from None
    return cfg
