"""Configs with their method sections validated: where the config schema meets the registry.

bench.config knows no method; here each `methods.<name>` section is checked against its
method's own pydantic model, so a typo in a hyperparameter is one error line naming it.
"""

from __future__ import annotations

from pydantic import ValidationError

from bench.api import MethodConfig, get_method
from bench.config import ConfigError, ExperimentConfig, format_validation, read_config


def method_config(cfg: ExperimentConfig, name: str) -> MethodConfig:
    """The validated hyperparameters of method `name` (its section, or its defaults; the keys it
    shares with another method's section (`Server.shares_config`) come from there unless its
    own section sets them)."""
    cls = get_method(name)
    section = dict(cfg.methods.get(name, {}))
    if cls.shares_config is not None:
        parent, keys = cls.shares_config
        inherited = {k: v for k, v in cfg.methods.get(parent, {}).items() if k in keys}
        section = {**inherited, **section}
    try:
        return cls.Config.model_validate(section)
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
