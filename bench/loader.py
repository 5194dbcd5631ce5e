"""Configs with their method sections validated: where the config schema meets the registry.

bench.config knows no method; here each `methods.<name>` section is checked against its
method's own pydantic model, so a typo in a hyperparameter is one error line naming it.
"""

from __future__ import annotations

from pydantic import ValidationError

from bench.api import MethodConfig, get_method
from bench.config import ConfigError, ExperimentConfig, format_validation, read_config


def method_config(cfg: ExperimentConfig, name: str) -> MethodConfig:
    """The validated hyperparameters of method `name` (its section, or its defaults)."""
    cls = get_method(name)
    try:
        return cls.Config.model_validate(cfg.methods.get(name, {}))
    except ValidationError as e:
        raise ConfigError(format_validation(e, prefix=f"methods.{name}")) from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config (or defaults), apply --set overrides, validate everything, method
    sections included (each must name a registered method)."""
    cfg = read_config(path, overrides)
    for name in cfg.methods:
        try:
            method_config(cfg, name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg
