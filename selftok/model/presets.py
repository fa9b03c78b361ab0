"""Named tokenizer architectures (a ``DiT_models``-style registry) and config loading by preset name.

Official (256 px, SD3-VAE latents, Enc-Qformer-Uni-XL/2 encoder, 32768 × 16 codebook, SD3-medium-sized
MMDiT-XL decoder or renderer, 2.17 B parameters):
``selftok-512`` / ``selftok-1024`` (diffusion decoder), ``selftok-renderer-512`` / ``selftok-renderer-1024``.
The 1024-token stage split 384,368,144,96,32 is an assumption (no official K = 1024 config exists; it
changes no tensor shape). Small ones for CPUs and tests: ``shapes-64`` (64-px pixel-space latents, decoder +
renderer, ~10 M parameters) and ``tiny`` (a few hundred thousand parameters, for tests).

Any size can also be given explicitly: start from a preset and override keys, e.g.
``load_tokenizer_config("selftok-512", overrides=["encoder.depth=2", "decoder.depth=2", "decoder.num_heads=2"])``
builds a small model with the official structure.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from selftok.model.encoder import EncoderConfig
from selftok.model.latents import LatentConfig
from selftok.model.mmdit import MMDiTConfig
from selftok.model.quantizer import QuantizerConfig
from selftok.model.renderer import RendererConfig
from selftok.model.schedule import ScheduleConfig
from selftok.model.tokenizer import TokenizerConfig
from selftok.runtime.config import ConfigError, apply_overrides, from_dict, merge_config, read_config_file, to_dict

#: Official five-stage token split (K = 512) and the assumed K = 1024 split (2×).
OFFICIAL_STAGES = (200, 400, 600, 800, 1000)
OFFICIAL_K_PER_STAGE = {512: (192, 184, 72, 48, 16), 1024: (384, 368, 144, 96, 32)}


def official_encoder() -> EncoderConfig:
    """``Enc-Qformer-Uni-XL/2``."""
    return EncoderConfig(patch_size=2, hidden_size=64, num_heads=4, depth=16, query_dim=512, query_heads=8)


def official_tokenizer(K: int = 512, renderer: bool = False) -> TokenizerConfig:
    """The released architecture: diffusion decoder (``256-eval.yml``) or renderer (``renderer-eval.yml``)."""
    schedule = (ScheduleConfig.linear(K) if renderer
                else ScheduleConfig(K=K, stages=OFFICIAL_STAGES, k_per_stage=OFFICIAL_K_PER_STAGE[K]))
    return TokenizerConfig(
        image_size=256,
        latent=LatentConfig(kind="sd3_vae"),
        schedule=schedule,
        encoder=official_encoder(),
        quantizer=QuantizerConfig(codebook_size=32768, code_dim=16),
        decoder=None if renderer else MMDiTConfig(depth=24, num_heads=24, head_dim=64, pos_embed_max_size=192),
        renderer=RendererConfig(depth=24, num_heads=24, head_dim=64) if renderer else None,
    )


def shapes_64() -> TokenizerConfig:
    """64-px shapes world: lossless 4× pixel-unshuffle latents (48 × 16 × 16), 64 tokens, decoder + renderer."""
    return TokenizerConfig(
        image_size=64,
        latent=LatentConfig(kind="pixel", factor=4),
        schedule=ScheduleConfig(K=64, stages=OFFICIAL_STAGES, k_per_stage=(24, 20, 10, 6, 4)),
        encoder=EncoderConfig(patch_size=2, hidden_size=64, num_heads=4, depth=4, query_dim=128, query_heads=4),
        quantizer=QuantizerConfig(codebook_size=1024, code_dim=16),
        decoder=MMDiTConfig(depth=4, num_heads=4, head_dim=32),
        renderer=RendererConfig(depth=4, num_heads=4, head_dim=32),
    )


def tiny() -> TokenizerConfig:
    """A few-hundred-thousand-parameter model with every component, for tests (32-px pixel latents)."""
    return TokenizerConfig(
        image_size=32,
        latent=LatentConfig(kind="pixel", factor=4),
        schedule=ScheduleConfig(K=16, stages=OFFICIAL_STAGES, k_per_stage=(6, 4, 3, 2, 1)),
        encoder=EncoderConfig(patch_size=2, hidden_size=32, num_heads=2, depth=2, query_dim=32, query_heads=2),
        quantizer=QuantizerConfig(codebook_size=64, code_dim=8),
        decoder=MMDiTConfig(depth=2, num_heads=2, head_dim=16),
        renderer=RendererConfig(depth=2, num_heads=2, head_dim=16),
    )


PRESETS: dict[str, Callable[[], TokenizerConfig]] = {
    "selftok-512": lambda: official_tokenizer(512),
    "selftok-1024": lambda: official_tokenizer(1024),
    "selftok-renderer-512": lambda: official_tokenizer(512, renderer=True),
    "selftok-renderer-1024": lambda: official_tokenizer(1024, renderer=True),
    "shapes-64": shapes_64,
    "tiny": tiny,
}


def get_preset(name: str) -> TokenizerConfig:
    """A fresh TokenizerConfig for a preset name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown tokenizer preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def load_tokenizer_config(preset: str | None = None, path: str | Path | None = None,
                          overrides: list[str] | None = None) -> TokenizerConfig:
    """Preset (optional) ← YAML file (optional, keys merged over the preset) ← dotted overrides."""
    data: dict[str, Any] = to_dict(get_preset(preset)) if preset else {}
    if path is not None:
        data = merge_config(data, read_config_file(path))
    return from_dict(TokenizerConfig, apply_overrides(data, overrides or []))

