"""PFA + DET, the research notes' pairing: DET's clients under PFA's server.

Each client keeps its personal model P (DET); its deputy D is what takes the server's model,
and that model is PFA's: the clients' low-frequency spectra averaged in the growing band, the
high frequencies the client's own, here P's. So the deputy arrives as P's high frequencies
under the federation's low band, instead of FedAvg's whole global model as in `det`; the
deputies' full weights go up and the server reads their spectra. Recover, Exchange and
Sublimate then run as in DET.
"""

from __future__ import annotations

from baselines.pfl.common import State
from baselines.pfl.mutual import DETClient, DETConfig, DETServer
from baselines.pfl.pfa import PFA, PFAConfig, own_with_low_band
from bench.api import register


class PFADETConfig(DETConfig, PFAConfig):
    """DET's thresholds and PFA's band."""


class PFADETClient(DETClient):
    config: PFADETConfig

    def arriving(self, glob: State, kept: State | None) -> State:
        if "band" not in glob:  # before the first aggregation: the initial model
            return super().arriving(glob, kept)
        return own_with_low_band(self, glob, kept)


@register
class PFADET(DETServer, PFA):
    name = "pfa_det"
    summary = "PFA + DET: DET's kept personal model and deputy, the deputy taking PFA's low band over P's high frequencies"
    Config = PFADETConfig
    ClientClass = PFADETClient
    config: PFADETConfig
