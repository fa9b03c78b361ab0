"""Rectified flow: interpolation, velocity target, time shift and the Euler sampler.

Convention: t ∈ [0, 1], t = 1 is pure noise, ``x_t = t·ε + (1−t)·x0``; the model predicts the velocity
``v = ε − x0``. Sampling integrates from t = 1 to 0 with Euler steps ``x ← x − (t_i − t_{i+1})·v`` on the
official uniform float32 grid (`TokenSchedule.sampler_grid`); no noise is injected after the start. The
visible-token prefix changes at every step (it shrinks as t decreases), following the token schedule.
Official quirk kept: with a shift s ≠ 1 the model is fed the shifted time while the Euler step and the
token schedule use the unshifted grid (the released sampler uses s = 1, where this does not matter).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from selftok.model.schedule import SamplerGrid


@dataclass
class FlowConfig:
    """Rectified-flow settings."""

    shift: float = 1.0
    """Resolution shift s of the time fed to the model, ``t' = s·t/(1+(s−1)·t)`` (official 1.0 at 256 px)."""

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"flow.shift must be positive, got {self.shift}")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """``s·t / (1 + (s−1)·t)``: identity for s = 1, spends more time near noise for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def sample_time(batch: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """Training times t ~ U(0, 1): (B,) float32 (the official recipe draws uniform t despite its config)."""
    return torch.rand(batch, generator=generator, device=device)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = t·noise + (1−t)·x0`` with t (B,) broadcast over the other dims."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return t * noise + (1 - t) * x0


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity ``noise − x0``."""
    return noise - x0


def flow_loss(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Per-sample velocity MSE (mean over C, H, W): (B,). The official loss averages it over the batch."""
    return (v_pred.float() - velocity_target(x0, noise).float()).pow(2).flatten(1).mean(dim=1)


def euler_step(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One Euler step towards t_next in float32: ``x − (t − t_next)·v``."""
    return x.float() - (t - t_next).float() * v.float()


#: velocity_fn(x_t (B, C, H, W) float32, t (B,) float32 model time, num_visible) -> velocity (B, C, H, W)
VelocityFn = Callable[[Tensor, Tensor, int], Tensor]


def euler_sample(velocity_fn: VelocityFn, noise: Tensor, grid: SamplerGrid, shift: float = 1.0) -> Tensor:
    """Integrate from `noise` at t = 1 to t = 0 along `grid`; step i shows ``grid.last_visible[i] + 1`` tokens.

    Returns: (B, C, H, W) float32 latent at t = 0."""
    x = noise.float()
    B = x.shape[0]
    for i in range(len(grid.t)):
        t_model = shift_time(grid.t[i].expand(B), shift)
        v = velocity_fn(x, t_model, int(grid.last_visible[i]) + 1)
        x = euler_step(x, v, grid.t[i], grid.t_next[i])
    return x
