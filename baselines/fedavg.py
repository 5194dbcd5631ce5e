"""FedAvg (McMahan et al., 2017) on frozen features: sample-weighted averaging of a head."""

from baselines.head import HeadServer
from bench.api import register


@register
class FedAvg(HeadServer):
    name = "fedavg"
    summary = "FedAvg: local SGD on a linear/MLP head over frozen features, sample-weighted averaging"
