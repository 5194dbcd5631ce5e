"""Federation rules the runner and every parameter-averaging method share: how client
updates are combined (mean, median, trimmed mean, Krum, Multi-Krum, attention) and how
malicious clients corrupt theirs (random update, sign flip, scaling, label flipping, free
rider). Methods combine through `Server.combine` (the runner injects a `RuleAggregator`);
attacks are applied around `local_train` by the executors, so no method carries a copy of either."""

from bench.federation.aggregation import RuleAggregator, combine, count_sketch, mean_aggregator
from bench.federation.attacks import attack_update, flip_labels, malicious_clients
from bench.federation.mean import weighted_average

__all__ = [
    "RuleAggregator",
    "attack_update",
    "combine",
    "count_sketch",
    "flip_labels",
    "malicious_clients",
    "mean_aggregator",
    "weighted_average",
]
