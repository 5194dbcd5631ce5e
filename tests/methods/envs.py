"""The method environment the FedAME tests drive their servers and clients in (no backbone)."""

from bench.api import MethodEnv, TrainSettings
from bench.federation import mean_aggregator


def synthetic_env(dim: int, names: tuple[str, ...], superclasses: tuple[int, ...], clients: int = 2) -> MethodEnv:
    """Features of width `dim`, classes `names` in clusters `superclasses`; 3 local epochs of 16."""
    return MethodEnv(
        aggregator=mean_aggregator(),
        feature_dim=dim,
        num_classes=len(names),
        class_names=names,
        dataset="synthetic",
        run_seed=0,
        num_clients=clients,
        train=TrainSettings(3, 16, "sgd", 0.05, 0.9, 0.0),
        superclasses=superclasses,
    )
