"""`fedame_plus`: FedAME with the improvements this project measured, under its own name.

Why a second method: a paper table row named FedAME must be the design (fedame/config.py),
while the additions that raise accuracy (a FeCAM-style Gaussian score of backbone features,
prompts kept in feature space, class-prototype scores, routing by the classes an expert
owns, contrast on replayed samples) are not in it. Each addition is a switch of
FedAMEConfig; this class only turns them on. docs/fedame.md walks from one to the other,
one switch per step, each measured on validation data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bench.api import register
from fedame import records
from fedame.config import FedAMEConfig
from fedame.server import FedAME


class FedAMEPlusConfig(FedAMEConfig):
    """The switches `fedame_plus` turns on (every other default is `fedame`'s)."""

    route_targets: Literal["cluster", "owned"] = "owned"
    prompt_space: Literal["anchor", "feature"] = "feature"
    replay_classes: Literal["old", "seen"] = "seen"
    prototype_weight: float = Field(1.0, ge=0)
    gaussian_weight: float = Field(1.0, ge=0)
    contrast_samples: Literal["replay", "real"] = "replay"


@register
class FedAMEPlus(FedAME):
    name = "fedame_plus"
    summary = "FedAME + Gaussian (FeCAM-style) scores, feature-space prompts, prototype scores: not the design (docs/fedame.md)"
    Config = FedAMEPlusConfig
    # the inputs (anchors, clusters) and the decision maker are fedame's: a config sets them once
    shares_config = ("fedame", ("anchors", "clusters", "decisions", "llm", "rule"))
    run_flags = (records.require_llm("fedame_plus"),)
