"""Training objectives of the two Selftok stages, as pure functions.

Stage 1 (tokenizer): the rectified-flow velocity loss of the MMDiT decoder, conditioned on the quantized
tokens visible at each sample's time (the DiTi prefix), with condition dropout; plus the quantizer loss.
Stage 2 (renderer): a one-step regression of the clean latent from all K tokens. The paper does not publish
the renderer loss; the terms here (latent MSE, optional L1, optional edge term, optional perceptual term) and
the reasons for the shipped weights are in docs/tokenizer_training.md.

Conventions: t ∈ [0, 1], t = 1 is pure noise; ``x_t = t·ε + (1−t)·x0``; the decoder predicts ``v = ε − x0``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from selftok.model.flow import shift_time
from selftok.model.latents import PixelLatents
from selftok.model.schedule import visible_mask
from selftok.training.shape_net import shape_distance

#: Shifted-time buckets of the logged stage-1 loss (official ``loss_small`` / ``loss_mid`` / ``loss_large``).
T_BUCKETS = (("small", 0.0, 0.35), ("mid", 0.35, 0.7), ("large", 0.7, 1.0))


class FlowBatch(NamedTuple):
    """The random draws of one stage-1 step (drawn outside the model so a step is a pure function of them)."""

    t: Tensor            # (B,) float32 unshifted time in [0, 1]; sets the visible tokens
    t_model: Tensor      # (B,) float32 shifted time fed to the model and used for x_t
    noise: Tensor        # (B, C, H, W) float32 ε
    visible: Tensor      # (B, K) bool: DiTi prefix, all False for condition-dropped samples
    dropped: Tensor      # (B,) bool: condition dropout (unconditional) samples


def sample_times(batch: int, kind: str, generator: torch.Generator, logit_mean: float = 0.0,
                 logit_std: float = 1.0) -> Tensor:
    """Training times (B,) float32: ``uniform`` (the official recipe) or ``logit_normal`` = sigmoid(N(m, s))."""
    if kind == "uniform":
        return torch.rand(batch, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    raise ValueError(f"unknown time sampling {kind!r}; use uniform or logit_normal")


def draw_flow_batch(last_visible_fn, latent_shape: tuple[int, ...], K: int, generator: torch.Generator,
                    time_sampling: str = "uniform", shift: float = 1.0, condition_dropout: float = 0.1,
                    logit_mean: float = 0.0, logit_std: float = 1.0) -> FlowBatch:
    """Draw t, the shifted model time, ε, the visible-token mask and the dropout flags for one batch.

    `last_visible_fn`: (B,) unshifted t → (B,) last visible token index (``TokenSchedule.last_visible_at``).
    The token index uses the unshifted t, the model sees the shifted one (official ``ImageTokenizer``)."""
    B = latent_shape[0]
    t = sample_times(B, time_sampling, generator, logit_mean, logit_std)
    t_model = shift_time(t, shift)
    noise = torch.randn(latent_shape, generator=generator)
    dropped = torch.rand(B, generator=generator) < condition_dropout
    visible = visible_mask(last_visible_fn(t), K)
    return FlowBatch(t, t_model, noise, visible & ~dropped[:, None], dropped)


def bucket_losses(per_sample: Tensor, t_model: Tensor, dropped: Tensor) -> dict[str, tuple[float, int]]:
    """Per-sample losses grouped by shifted time (and the unconditional ones): name → (sum, count).

    Sums and counts (not means) so that ranks and logging windows can be pooled exactly."""
    out = {}
    for name, lo, hi in T_BUCKETS:
        sel = (t_model > lo) & (t_model <= hi) if lo > 0 else (t_model <= hi)
        out[f"loss_{name}"] = (float(per_sample[sel].sum()), int(sel.sum()))
    out["loss_uncon"] = (float(per_sample[dropped].sum()), int(dropped.sum()))
    return out


def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Finite differences along H and W of (B, C, H, W): (B, C, H−1, W), (B, C, H, W−1)."""
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def gradient_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute difference of the image gradients (an edge term: zero for a constant offset, large for
    blurred or misplaced edges). (B, C, H, W) pairs → scalar."""
    (py, px), (ty, tx) = image_gradients(pred.float()), image_gradients(target.float())
    return 0.5 * ((py - ty).abs().mean() + (px - tx).abs().mean())


def renderer_loss(pred_latent: Tensor, target_latent: Tensor, pred_pixels: Tensor | None = None,
                  target_pixels: Tensor | None = None, mse_weight: float = 1.0, l1_weight: float = 0.0,
                  gradient_weight: float = 0.0, perceptual: torch.nn.Module | None = None,
                  perceptual_weight: float = 0.0, shape_net: torch.nn.Module | None = None,
                  shape_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Stage-2 loss: ``w_mse·MSE + w_l1·L1`` and ``w_shape·shape_distance`` on latents,
    ``w_grad·gradient_loss`` and ``w_perc·perceptual`` on pixels (needed only when those weights are
    non-zero; pixels in [0, 1]). Returns (loss, terms)."""
    diff = pred_latent.float() - target_latent.float()
    terms = {"mse": diff.pow(2).mean()}
    if l1_weight:
        terms["l1"] = diff.abs().mean()
    if (gradient_weight or (perceptual is not None and perceptual_weight)) and (
            pred_pixels is None or target_pixels is None):
        raise ValueError("the gradient and perceptual terms need pixel-space predictions and targets")
    if gradient_weight:
        terms["gradient"] = gradient_loss(pred_pixels, target_pixels)
    if perceptual is not None and perceptual_weight:
        terms["perceptual"] = perceptual(pred_pixels.float(), target_pixels.float()).mean()
    if shape_net is not None and shape_weight:
        terms["shape"] = shape_distance(shape_net, pred_latent, target_latent).mean()
    weights = {"mse": mse_weight, "l1": l1_weight, "gradient": gradient_weight, "perceptual": perceptual_weight,
               "shape": shape_weight}
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, {k: float(v.detach()) for k, v in terms.items()}


def delayed_ramp(step: int, start: int, ramp_steps: int) -> float:
    """0 for the first `start` steps, then linear to 1 over `ramp_steps` steps, then 1. The quantizer's
    continuous → quantized mix (the straight-through offset scaled by it; `start` = ``continuous_steps``) and
    the late start of the renderer's shape term (``stage1.shape_start``)."""
    if step < start:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start + 1) / ramp_steps)


def pixels_from_latents(latents: Tensor, adapter) -> Tensor:
    """Differentiable pixels (B, 3, H, W) in [0, 1] of `adapter`'s latents: pixel-unshuffle latents in
    [−1, 1] are shuffled back (unclamped); a learned autoencoder decodes them."""
    if isinstance(adapter, PixelLatents):
        return (F.pixel_shuffle(latents, adapter.factor) + 1) / 2
    return adapter.decode(latents)
