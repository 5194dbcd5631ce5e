"""Data-free replay: old classes' samples drawn from their distribution prompts."""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from fedame.feature_prompts import draw_noise, features_from_noise
from fedame.prompts import sample
from fedame.router import Projector


class Replay:
    """Draws replayed samples with their class positions: backbone features in feature mode
    (the caller projects them, together with its real samples), anchor-space points otherwise.

    Feature-mode samples are drawn an epoch at a time (`per_step`: how many each step of an
    epoch replays), at the epoch's first step: the generator is called in the same order as
    step by step, so the classes and noise are the same, and the epoch's low-rank products
    are one grouped product instead of one gather and product per step (the same dot
    products; batched differently, they may round apart in the last bit)."""

    def __init__(
        self,
        feature: bool,
        cls_pos: torch.Tensor,
        which: torch.Tensor,
        prompts: tuple[torch.Tensor, ...],
        n_classes: int,
        per_step: list[int],
    ) -> None:
        self.feature, self.cls_pos, self.which, self.prompts, self.per_step = feature, cls_pos, which, prompts, per_step
        self.n = len(which)
        self.drawn = 0  # samples replayed so far (reported, so an ablation can be checked)
        self.covers = torch.zeros(n_classes, dtype=torch.bool, device=cls_pos.device)
        self.covers[cls_pos[which]] = True
        self._ahead: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    def draw(self, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        self.drawn += m
        if not self.feature:
            pick = self._pick(m, gen)
            return self.cls_pos[pick], sample(*self.prompts, pick, gen)
        if not self._ahead:
            self._ahead.extend(self._draw_epoch(gen))
        cls, samples = self._ahead.popleft()
        if len(cls) != m:
            raise RuntimeError(f"replay drew {len(cls)} samples ahead for this step, which asks for {m}")
        return cls, samples

    def _pick(self, m: int, gen: torch.Generator) -> torch.Tensor:
        return self.which[torch.randint(self.n, (m,), generator=gen).to(self.which.device)]

    def _draw_epoch(self, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mu, L, sd = self.prompts
        picks, zs, es = [], [], []
        for m in self.per_step:  # the calls sample_features would make, step after step
            picks.append(self._pick(m, gen))
            z, e = draw_noise(m, L.shape[2], mu.shape[1], gen)
            zs.append(z)
            es.append(e)
        pick = torch.cat(picks)
        x = features_from_noise(mu, L, sd, pick, torch.cat(zs).to(mu.device), torch.cat(es).to(mu.device))
        return list(zip(self.cls_pos[pick].split(self.per_step), x.split(self.per_step)))

    def targets(self, proj: Projector) -> torch.Tensor:
        """The prompt means in the anchor space (the prototypes' targets)."""
        return proj(self.prompts[0]) if self.feature else F.normalize(self.prompts[0], dim=-1)
