"""Reconstruction metrics: PSNR and SSIM on images in [0, 1].

Both are computed per image in float32 on whatever device the images live on.
PSNR follows the official Selftok evaluator (8-bit pixels: images are quantised to uint8 before the MSE when
``quantize=True``, which is the default). SSIM is the standard single-scale SSIM of Wang et al. (2004): an
11×11 Gaussian window with σ = 1.5, constants ``C1 = (0.01·L)²``, ``C2 = (0.03·L)²``, L = 1, computed per channel
on the valid region (no padding) and averaged over channels and positions — the settings of
``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Reported for identical images, where the official evaluator's formula gives +inf: a finite value keeps means
#: and JSON records usable (strict JSON has no infinity).
PSNR_MAX_DB = 100.0


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def to_uint8_levels(images: Tensor) -> Tensor:
    """[0, 1] floats → their 8-bit level as the official evaluator writes its PNGs (``x·255 + 0.5``, truncated:
    halves round up), still as floats in [0, 1]."""
    return (images.float().clamp(0, 1) * 255 + 0.5).floor() / 255


def psnr(a: Tensor, b: Tensor, quantize: bool = True) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: (B, C, H, W) pairs in [0, 1] → (B,).

    ``10·log10(1 / MSE)`` in float64 (with 8-bit levels: the official ``20·log10(255) − 10·log10(MSE₂₅₅)``);
    identical images give `PSNR_MAX_DB`. `quantize` takes both to 8-bit levels first (`to_uint8_levels`)."""
    _check_pair(a, b)
    if quantize:
        a, b = to_uint8_levels(a), to_uint8_levels(b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(1.0 / mse.clamp_min(1e-20))
    return out.clamp(max=PSNR_MAX_DB).float()


def gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | None = None) -> Tensor:
    """Normalised 1-D Gaussian (size,)."""
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    w = torch.exp(-x.pow(2) / (2 * sigma ** 2))
    return w / w.sum()


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image: (B, C, H, W) pairs in [0, 1] → (B,). Images must be ≥ window px."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} px, got {tuple(a.shape[-2:])}")
    a, b = a.float(), b.float()
    C = a.shape[1]
    g = gaussian_window(window, sigma, a.device)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window).contiguous()

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
