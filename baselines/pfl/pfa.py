"""Progressive Fourier Aggregation (PFA), after the research notes and its journal version.

Each parameter goes to the frequency domain by FFT: a weight matrix by a 2-d FFT, a
convolution kernel reshaped to (out, in x k x k) first, as the paper does, a bias by a 1-d
FFT, and the classifier's weight row by row (one class's row is one signal, so classes do
not mix). The server averages the clients' spectra in their low-frequency band, amplitude
and phase (the phase as the angle of the mean unit phasor), by the run's aggregation rule;
each client takes that band and keeps its own high frequencies. The band grows linearly
over training from `band_start` to `band_end` (the share of each axis's frequencies, lowest
first; 1 averages the whole spectrum).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from baselines.pfl.common import PFLClient, PFLServer, State, Trained, personal_of
from baselines.pfl.model import HEAD, PFLConfig, initial_state
from bench.api import ClientUpdate, TrainContext, register


class PFAConfig(PFLConfig):
    band_start: float = Field(0.2, gt=0, le=1)
    band_end: float = Field(0.6, gt=0, le=1)


def as_signal(key: str, w: np.ndarray) -> np.ndarray:
    """The array the FFT runs over: matrices as they are, kernels as (out, in*k*k), biases 1-d."""
    return w.reshape(w.shape[0], -1) if w.ndim > 2 else w


def axes_of(key: str, signal: np.ndarray) -> tuple[int, ...]:
    """The FFT's axes: the classifier's rows one by one (per class), other matrices in 2-d."""
    if signal.ndim == 2:
        return (1,) if key.startswith(HEAD) else (0, 1)
    return (0,)


def low_band(shape: tuple[int, ...], axes: tuple[int, ...], band: float) -> np.ndarray:
    """True at the frequencies within the lowest `band` share of every axis in `axes`."""
    mask = np.ones(shape, dtype=bool)
    for ax in axes:
        f = np.abs(np.fft.fftfreq(shape[ax]))  # 0 .. 0.5
        keep = f <= band * 0.5 + 1e-12
        mask &= keep.reshape([-1 if i == ax else 1 for i in range(len(shape))])
    return mask


def spectrum(key: str, w: np.ndarray) -> np.ndarray:
    s = as_signal(key, w).astype(np.float64)
    return np.fft.fftn(s, axes=axes_of(key, s))


def merged(key: str, own: np.ndarray, amp: np.ndarray, phase: np.ndarray, band: float) -> np.ndarray:
    """`own` with its low band replaced by the averaged amplitude and phase."""
    s = as_signal(key, own)
    axes = axes_of(key, s)
    mask = low_band(s.shape, axes, band)
    f = np.where(mask, amp * np.exp(1j * phase), np.fft.fftn(s.astype(np.float64), axes=axes))
    return np.real(np.fft.ifftn(f, axes=axes)).astype(own.dtype).reshape(own.shape)


def own_with_low_band(client: PFLClient, glob: State, kept: State | None) -> State:
    """The client's own model (the initial one before it has one) with the server's averaged
    low band in place of its own (`glob` holds the band and the spectra)."""
    own = initial_state(client.config, client.env) if kept is None else personal_of(kept)
    band = float(glob["band"])
    return {k: merged(k, own[k], glob["amp." + k], glob["phase." + k], band) for k in client.keys}


class PFAClient(PFLClient):
    config: PFAConfig

    def received(self, glob: State, kept: State | None) -> State:
        if "band" not in glob:  # before the first aggregation: the initial model
            return super().received(glob, kept)
        return own_with_low_band(self, glob, kept)

    def train_round(self, glob: State, kept: State | None, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext) -> Trained:
        tr = super().train_round(glob, kept, x, y, ctx)
        return Trained(tr.personal, tr.personal, tr.loss)  # every parameter goes up: the server reads its spectrum


@register
class PFA(PFLServer):
    name = "pfa"
    summary = "PFA: clients' low-frequency spectra (amplitude and phase) averaged in a band that grows over training"
    Config = PFAConfig
    ClientClass = PFAClient
    config: PFAConfig

    def band_after(self, rounds_done: int) -> float:
        """The band clients take after `rounds_done` rounds: band_start after the first, band_end after the last."""
        c = self.config
        return c.band_start + (c.band_end - c.band_start) * min(1.0, (rounds_done - 1) / max(1, self.rounds - 1))

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        """Per parameter: amplitude and unit phasor of each client's spectrum, combined by the run's rule."""
        spectra = []
        for u in updates:
            arrays: State = {}
            for k in self.client.keys:
                f = spectrum(k, u.arrays[k])
                arrays.update({"amp." + k: np.abs(f), "cos." + k: np.cos(np.angle(f)), "sin." + k: np.sin(np.angle(f))})
            spectra.append(ClientUpdate(arrays=arrays, num_samples=u.num_samples, client_id=u.client_id))
        avg = self.combine(spectra, sorted(spectra[0].arrays))
        self.spectra = {"band": np.array(self.band_after(self.round + 1))}
        for k in self.client.keys:
            self.spectra.update({"amp." + k: avg["amp." + k], "phase." + k: np.arctan2(avg["sin." + k], avg["cos." + k])})
        self.round += 1
        self._payload = None

    def setup(self) -> None:
        super().setup()
        self.spectra: State = {}

    def extra_payload(self) -> State:
        return self.spectra
