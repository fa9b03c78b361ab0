"""Latent adapters: images (B, 3, H, W) in [0, 1] ⇄ the latent space the tokenizer works in.

* ``sd3_vae``: the Stable Diffusion 3 VAE (16 channels, 8× down) through
  ``diffusers.AutoencoderKL.from_pretrained(local_dir)``; pixels are mapped to [−1, 1], encoding takes the
  posterior **mode**, and latents are normalised ``z' = (z − 0.0609)·1.5305`` (inverse on the way out).
  Nothing is downloaded: `path` is a local diffusers directory (the VAE folder itself, or a pipeline folder
  with a ``vae/`` subfolder). The VAE is loaded lazily on first use and is not part of the tokenizer's
  weights.
* ``autoencoder``: a small learned diffusers ``AutoencoderKL`` (the SD3 VAE's class in a tiny config) for
  small images such as the 64-px shapes world, trained by ``selftok.train`` ("stage 0") and then frozen. Its
  weights and per-channel latent normalisation ``z' = (z − mean) / std`` are part of the tokenizer's
  weights (``latents.*`` in ``model.safetensors``), so a saved tokenizer needs nothing else. It always runs
  in float32: under bf16 autocast its convolutions are ~60× slower on CPU (measured, 2 cores).
* ``pixel``: a lossless pixel-space adapter for small images: [−1, 1] pixels, pixel-unshuffled by `factor`
  into 3·factor² channels. Decoding is the exact inverse (then clamped). Kept for tests and as an option.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: SD3 latent normalisation (official ``SD3LatentFormat``).
SD3_SHIFT = 0.0609
SD3_SCALE = 1.5305
SD3_CHANNELS = 16
SD3_FACTOR = 8


@dataclass
class AutoencoderConfig:
    """The architecture of a learned ``autoencoder`` latent space: a diffusers ``AutoencoderKL``, one
    stride-2 stage per entry of `block_out_channels` after the first (3 stages: 8× down)."""

    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (8, 16, 32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_block_attention: bool = False
    """The mid-block self-attention of the SD VAEs; off by default (no measurable gain on small images)."""

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if self.latent_channels < 1 or self.layers_per_block < 1 or not self.block_out_channels:
            raise ValueError("autoencoder.latent_channels, layers_per_block and block_out_channels must be positive")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"autoencoder.block_out_channels {bad} are not divisible by norm_num_groups "
                             f"{self.norm_num_groups}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class LatentConfig:
    """Which latent space the tokenizer works in."""

    kind: Literal["sd3_vae", "autoencoder", "pixel"] = "sd3_vae"
    """``sd3_vae`` (SD3 VAE, 16 channels, 8× down), ``autoencoder`` (a learned small AutoencoderKL, part of
    the tokenizer's weights) or ``pixel`` (lossless pixel-unshuffle)."""
    path: str | None = None
    """sd3_vae: local diffusers directory of the VAE (or of a pipeline with a ``vae/`` subfolder)."""
    factor: int = 8
    """Downsampling factor: 8 for sd3_vae (fixed by the VAE); the autoencoder's; the unshuffle factor for
    pixel."""
    vae_dtype: Literal["float32", "bfloat16"] = "float32"
    """sd3_vae: dtype the VAE runs in (the official pipeline uses bfloat16 on GPU)."""
    autoencoder: AutoencoderConfig | None = None
    """autoencoder: its architecture (default `AutoencoderConfig()`)."""

    def __post_init__(self) -> None:
        if self.kind == "sd3_vae" and self.factor != SD3_FACTOR:
            raise ValueError(f"latent.factor must be {SD3_FACTOR} for the SD3 VAE, got {self.factor}")
        if self.factor < 1:
            raise ValueError(f"latent.factor must be positive, got {self.factor}")
        if self.kind == "autoencoder":
            self.autoencoder = self.autoencoder or AutoencoderConfig()
            if self.autoencoder.factor != self.factor:
                raise ValueError(f"latent.factor {self.factor} disagrees with the autoencoder's "
                                 f"{len(self.autoencoder.block_out_channels) - 1} stride-2 stages "
                                 f"(factor {self.autoencoder.factor})")
        elif self.autoencoder is not None:
            raise ValueError(f"latent.autoencoder is set but latent.kind is {self.kind!r}; use kind: autoencoder")

    @property
    def channels(self) -> int:
        """Latent channels: 16 for the SD3 VAE, the autoencoder's, 3·factor² for pixel-unshuffle."""
        if self.kind == "autoencoder":
            return self.autoencoder.latent_channels
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


class AutoencoderLatents(nn.Module):
    """A learned AutoencoderKL adapter (a module: its weights and normalisation are the tokenizer's):
    (B, 3, H, W) in [0, 1] ⇄ normalised posterior-mode latents (B, C, H/f, W/f). Gradients flow through
    `decode` (stage-1 objectives on pixels); `reconstruct` is the stage-0 training path."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        from diffusers import AutoencoderKL
        self.factor, self.channels = cfg.factor, cfg.latent_channels
        n = len(cfg.block_out_channels)
        self.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                                 down_block_types=("DownEncoderBlock2D",) * n,
                                 up_block_types=("UpDecoderBlock2D",) * n,
                                 block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                                 norm_num_groups=cfg.norm_num_groups, mid_block_add_attention=cfg.mid_block_attention)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    def prepare(self, device: torch.device) -> None:
        """Nothing to load (the weights are the tokenizer's)."""

    def raw_encode(self, images: Tensor) -> Tensor:
        """Un-normalised posterior mode (B, C, h, w) float32 of images in [0, 1]."""
        check_images(images)
        H, W = images.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"image size {H}x{W} is not divisible by the autoencoder's factor {self.factor}")
        with torch.autocast(images.device.type, enabled=False):
            return self.vae.encode(images.float() * 2 - 1).latent_dist.mode()

    def encode(self, images: Tensor) -> Tensor:
        z = self.raw_encode(images)
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents → pixels in [0, 1] (differentiable)."""
        z = latents.float() * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        with torch.autocast(latents.device.type, enabled=False):
            return (self.vae.decode(z).sample.clamp(-1, 1) + 1) / 2

    def reconstruct(self, images: Tensor) -> Tensor:
        """Stage-0 training path: images in [0, 1] → unclamped reconstructions in [−1, 1] scale."""
        with torch.autocast(images.device.type, enabled=False):
            return self.vae.decode(self.raw_encode(images)).sample

    @torch.no_grad()
    def set_normalisation(self, raw: Tensor) -> None:
        """Per-channel mean and std of un-normalised training latents (N, C, h, w)."""
        self.latent_mean.copy_(raw.float().mean((0, 2, 3)))
        self.latent_std.copy_(raw.float().std((0, 2, 3)).clamp_min(1e-6))


def build_latent_adapter(cfg: LatentConfig) -> PixelLatents | SD3VAELatents | AutoencoderLatents:
    if cfg.kind == "pixel":
        return PixelLatents(cfg.factor)
    if cfg.kind == "autoencoder":
        return AutoencoderLatents(cfg.autoencoder)
    return SD3VAELatents(cfg.path, torch.bfloat16 if cfg.vae_dtype == "bfloat16" else torch.float32)
