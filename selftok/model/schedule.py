"""The DiTi token schedule: which encoder tokens the decoder may see at each diffusion time.

Time convention (project-wide): t ∈ [0, 1], t = 1 is pure noise. The schedule works on the 0–1000 scale
``τ = 1000·t``. It is piecewise linear: stage i covers ``[s_{i-1}, s_i)`` and adds ``k_i`` tokens, so the
last visible encoder index is ``k(τ) = B_i + n_i/(s_i − s_{i−1})·(τ − s_{i−1})`` (``B_i`` = tokens of the
earlier stages), truncated and clamped to ``[0, K−1]``. Token j is visible iff ``j ≤ k(τ)`` — a prefix of
the encoder order; token 0 is always visible and every token is visible at τ = 1000.

The arithmetic reproduces the official ``DiTi_cont`` bit for bit, including its float32 quirks:
* integer τ: each segment's product is computed in float32 and truncated *before* its base is added;
* float τ (training, ``1000·t``): the sum is truncated at the end;
* the sampler's grid is ``torch.linspace(1, 0, steps+1)`` in float32 times 1000, truncated to int64, so
  e.g. step 27 of 50 gives τ = 459 where exact arithmetic gives 460.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

#: The schedule's time resolution (τ = 1000·t).
TIMESTEPS = 1000


@dataclass
class ScheduleConfig:
    """Token schedule. Defaults: the released 256-px / 512-token tokenizer."""

    K: int = 512
    """Tokens per image (the encoder's number of queries)."""
    stages: tuple[int, ...] = (200, 400, 600, 800, 1000)
    """Upper bounds of the stages on the 0–1000 scale, strictly increasing."""
    k_per_stage: tuple[int, ...] = (192, 184, 72, 48, 16)
    """Tokens added in each stage; they must sum to K."""

    def __post_init__(self) -> None:
        self.stages = tuple(int(s) for s in self.stages)
        self.k_per_stage = tuple(int(k) for k in self.k_per_stage)
        if self.K < 1:
            raise ValueError(f"schedule.K must be positive, got {self.K}")
        if not self.stages or len(self.stages) != len(self.k_per_stage):
            raise ValueError(f"schedule.stages {list(self.stages)} and schedule.k_per_stage "
                             f"{list(self.k_per_stage)} must be non-empty and of equal length")
        bounds = (0,) + self.stages
        if any(lo >= hi for lo, hi in itertools.pairwise(bounds)):
            raise ValueError(f"schedule.stages must be positive and strictly increasing, got {list(self.stages)}")
        if any(k < 0 for k in self.k_per_stage):
            raise ValueError(f"schedule.k_per_stage must be non-negative, got {list(self.k_per_stage)}")
        if sum(self.k_per_stage) != self.K:
            raise ValueError(f"schedule.K = {self.K} disagrees with the schedule: k_per_stage "
                             f"{list(self.k_per_stage)} sums to {sum(self.k_per_stage)}")

    @classmethod
    def linear(cls, K: int) -> ScheduleConfig:
        """One stage over the whole range (the official renderer / FSQ configs)."""
        return cls(K=K, stages=(TIMESTEPS,), k_per_stage=(K,))


class SamplerGrid(NamedTuple):
    """The official Euler sampler's per-step values (float32 grid)."""

    t: Tensor            # (S,) float32, time at step i (1 → 1/S)
    t_next: Tensor       # (S,) float32, time after step i (→ 0)
    t_mapped: Tensor     # (S,) int64, truncation of 1000·t in float32
    last_visible: Tensor  # (S,) int64, last visible token index at step i


class TokenSchedule:
    """Maps diffusion times to the last visible token index (official ``DiTi_cont``)."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg
        self.K = cfg.K
        lows = (0,) + cfg.stages[:-1]
        self._segments = []
        base = 0
        for low, high, k in zip(lows, cfg.stages, cfg.k_per_stage):
            self._segments.append((low, float(k) / (high - low), base))
            base += k

    def last_visible(self, tau: Tensor) -> Tensor:
        """Last visible token index for times on the 0–1000 scale.

        Args: tau: (...) int64 (sampler) or float (training, ``1000·t``).
        Returns: (...) int64 in [0, K−1]."""
        ind = torch.zeros_like(tau)
        for low, slope, base in self._segments:
            xp = tau - low
            hit = xp >= 0
            ind[hit] = (slope * xp).to(ind.dtype)[hit] + base
        return ind.to(torch.long).clamp(0, self.K - 1)

    def last_visible_at(self, t: Tensor) -> Tensor:
        """Training form: t ∈ [0, 1] (unshifted), (B,) float → (B,) int64 via ``1000·t`` in float."""
        return self.last_visible(t * float(TIMESTEPS))

    def sampler_grid(self, steps: int, device: torch.device | None = None) -> SamplerGrid:
        """The official uniform Euler grid from t = 1 with `steps` steps, and its token indices."""
        if steps < 1:
            raise ValueError(f"the sampler needs at least one step, got {steps}")
        base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32, device=device)
        t, t_next = base[:-1], base[1:]
        t_mapped = (t * TIMESTEPS).long()
        return SamplerGrid(t, t_next, t_mapped, self.last_visible(t_mapped))


def visible_mask(last_visible: Tensor, K: int) -> Tensor:
    """Prefix visibility: (B,) last index → (B, K) bool, True where ``j ≤ last``."""
    return torch.arange(K, device=last_visible.device)[None, :] <= last_visible[:, None]
