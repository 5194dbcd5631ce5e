"""FedAME: Federated Anchor-guided Mixture-of-Experts, registered as the method `fedame`, and its
improvements as the separate method `fedame_plus` (`variant`).

Its rooms: `config` (hyperparameters), `model` (projector, anchor-routed mixture, prototypes),
`replay` (samples from the distribution prompts), `losses` (the five-term loss), `client`
(local training and what it reports), `server` (anchors, expert pool and decisions, prompts,
the KL teacher, aggregation and prediction). This module is what the `fedame_bench.methods`
entry point loads.
"""

from fedame.client import FedAMEClient
from fedame.config import FedAMEConfig, LossWeights
from fedame.model import on_device
from fedame.replay import Replay
from fedame.server import FedAME
from fedame.variant import FedAMEPlus, FedAMEPlusConfig

__all__ = ["FedAME", "FedAMEClient", "FedAMEConfig", "FedAMEPlus", "FedAMEPlusConfig", "LossWeights", "Replay", "on_device"]
