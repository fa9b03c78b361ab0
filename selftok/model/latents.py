"""Latent adapters: images (B, 3, H, W) in [0, 1] ⇄ the latent space the tokenizer works in.

* ``sd3_vae``: the Stable Diffusion 3 VAE (16 channels, 8× down) through
  ``diffusers.AutoencoderKL.from_pretrained(local_dir)``; pixels are mapped to [−1, 1], encoding takes the
  posterior **mode**, and latents are normalised ``z' = (z − 0.0609)·1.5305`` (inverse on the way out).
  Nothing is downloaded: `path` is a local diffusers directory (the VAE folder itself, or a pipeline folder
  with a ``vae/`` subfolder). The VAE is loaded lazily on first use and is not part of the tokenizer's
  weights.
* ``pixel``: a lossless pixel-space adapter for small images (e.g. the 64-px shapes world): [−1, 1] pixels,
  pixel-unshuffled by `factor` into 3·factor² channels. Decoding is the exact inverse (then clamped).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

#: SD3 latent normalisation (official ``SD3LatentFormat``).
SD3_SHIFT = 0.0609
SD3_SCALE = 1.5305
SD3_CHANNELS = 16
SD3_FACTOR = 8


@dataclass
class LatentConfig:
    """Which latent space the tokenizer works in."""

    kind: Literal["sd3_vae", "pixel"] = "sd3_vae"
    """``sd3_vae`` (SD3 VAE, 16 channels, 8× down) or ``pixel`` (lossless pixel-unshuffle)."""
    path: str | None = None
    """sd3_vae: local diffusers directory of the VAE (or of a pipeline with a ``vae/`` subfolder)."""
    factor: int = 8
    """Downsampling factor: 8 for sd3_vae (fixed by the VAE); the unshuffle factor for pixel."""
    vae_dtype: Literal["float32", "bfloat16"] = "float32"
    """sd3_vae: dtype the VAE runs in (the official pipeline uses bfloat16 on GPU)."""

    def __post_init__(self) -> None:
        if self.kind == "sd3_vae" and self.factor != SD3_FACTOR:
            raise ValueError(f"latent.factor must be {SD3_FACTOR} for the SD3 VAE, got {self.factor}")
        if self.factor < 1:
            raise ValueError(f"latent.factor must be positive, got {self.factor}")

    @property
    def channels(self) -> int:
        """Latent channels: 16 for the SD3 VAE, 3·factor² for pixel-unshuffle."""
        return SD3_CHANNELS if self.kind == "sd3_vae" else 3 * self.factor ** 2


def check_images(images: Tensor) -> None:
    """Raise a ValueError naming the problem unless images is float (B, 3, H, W) with values in [0, 1]."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must be RGB with 3 channels in dim 1, got {images.shape[1]} channels "
                         f"(shape {tuple(images.shape)}); convert grayscale/RGBA images to RGB first")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be a float tensor in [0, 1], got {images.dtype} "
                         f"(for uint8 pixels use images.float() / 255)")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if not (0.0 <= lo and hi <= 1.0):  # also rejects NaN
            raise ValueError(f"image values must lie in [0, 1], got min {lo:.4g}, max {hi:.4g}")


class PixelLatents:
    """Lossless pixel-unshuffle adapter: (B, 3, H, W) in [0, 1] ⇄ (B, 3f², H/f, W/f) in [−1, 1]."""

    def __init__(self, factor: int):
        self.factor = factor
        self.channels = 3 * factor ** 2

    def prepare(self, device: torch.device) -> None:
        """Nothing to load."""

    def encode(self, images: Tensor) -> Tensor:
        check_images(images)
        H, W = images.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"image size {H}x{W} is not divisible by the pixel-unshuffle factor {self.factor}")
        return F.pixel_unshuffle(images.float() * 2 - 1, self.factor)

    def decode(self, latents: Tensor) -> Tensor:
        return ((F.pixel_shuffle(latents.float(), self.factor) + 1) / 2).clamp(0, 1)


class SD3VAELatents:
    """SD3 VAE adapter: (B, 3, H, W) in [0, 1] ⇄ normalised latents (B, 16, H/8, W/8)."""

    factor = SD3_FACTOR
    channels = SD3_CHANNELS

    def __init__(self, path: str | None, dtype: torch.dtype = torch.float32):
        self.path = path
        self.dtype = dtype
        self._vae = None

    def vae(self, device: torch.device):
        """The diffusers AutoencoderKL, loaded from the local directory on first use, on `device`."""
        if self._vae is None:
            if self.path is None:
                raise ValueError("this tokenizer works in SD3-VAE latent space but no VAE directory was given: set "
                                 "latent.path (or pass vae_path=...) to a local diffusers AutoencoderKL directory, "
                                 "or use the *_latents methods")
            from diffusers import AutoencoderKL
            root = Path(self.path)
            sub = "vae" if not (root / "config.json").exists() and (root / "vae" / "config.json").exists() else None
            if not (root / (sub or "") / "config.json").exists():
                raise FileNotFoundError(f"no diffusers VAE config.json in {root} or {root / 'vae'}")
            self._vae = AutoencoderKL.from_pretrained(root, subfolder=sub, local_files_only=True,
                                                      torch_dtype=self.dtype).eval().requires_grad_(False)
            log.info("loaded the SD3 VAE from %s", root / (sub or ""))
        if self._vae.device != device:
            self._vae.to(device)
        return self._vae

    def prepare(self, device: torch.device) -> None:
        """Load the VAE now (so that a missing VAE is reported before a long decode, not after)."""
        self.vae(device)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        check_images(images)
        H, W = images.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"image size {H}x{W} is not divisible by the VAE factor {self.factor}")
        vae = self.vae(images.device)
        z = vae.encode((images * 2 - 1).to(self.dtype)).latent_dist.mode()
        return (z.float() - SD3_SHIFT) * SD3_SCALE

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae(latents.device)
        z = latents.float() / SD3_SCALE + SD3_SHIFT
        return ((vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1) + 1) / 2)


def build_latent_adapter(cfg: LatentConfig) -> PixelLatents | SD3VAELatents:
    if cfg.kind == "pixel":
        return PixelLatents(cfg.factor)
    return SD3VAELatents(cfg.path, torch.bfloat16 if cfg.vae_dtype == "bfloat16" else torch.float32)
