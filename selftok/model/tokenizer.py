"""The public Selftok tokenizer: images ⇄ K discrete codes whose order follows the reverse diffusion process.

``SelftokTokenizer(cfg)`` holds the encoder, the quantizer, and a diffusion decoder and/or a one-step
renderer. Codes are returned in ENCODER order (index 0 = the finest token, always visible to the decoder;
index K−1 = the coarsest); autoregressive models use the reverse. Images are float (B, 3, H, W) in [0, 1].

Inference methods never change any buffer, run no k-means and are deterministic (the diffusion decoder's
only randomness is its starting noise, drawn from `generator`). They work on any device and dtype: keep the
weights in float32 and use autocast, or `cast_for_inference(torch.bfloat16)`; the codebook lookup always
runs in float32.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from selftok.model.encoder import EncoderConfig, QFormerEncoder
from selftok.model.flow import FlowConfig, euler_sample
from selftok.model.latents import LatentConfig, build_latent_adapter
from selftok.model.mmdit import MMDiT, MMDiTConfig
from selftok.model.quantizer import CosineQuantizer, QuantizerConfig, QuantizerOutput
from selftok.model.renderer import Renderer, RendererConfig
from selftok.model.schedule import ScheduleConfig, TokenSchedule
from selftok.runtime.config import load_config, save_config

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


@dataclass
class TokenizerConfig:
    """A whole tokenizer. Defaults: the released 256-px / 512-token tokenizer with its diffusion decoder."""

    image_size: int = 256
    """Nominal image side in pixels (sets the position tables and the renderer's fixed output size)."""
    latent: LatentConfig = field(default_factory=LatentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: MMDiTConfig | None = field(default_factory=MMDiTConfig)
    """The 50-step rectified-flow decoder, or None."""
    renderer: RendererConfig | None = None
    """The one-step renderer, or None."""
    flow: FlowConfig = field(default_factory=FlowConfig)

    def __post_init__(self) -> None:
        f = self.latent.factor
        if self.image_size < 1 or self.image_size % f:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of the latent factor {f}")
        for name in ("encoder", "decoder", "renderer"):
            part = getattr(self, name)
            if part is not None and self.latent_size % part.patch_size:
                raise ValueError(f"the {self.latent_size}px latent grid is not divisible by {name}.patch_size "
                                 f"{part.patch_size}")
        for name in ("encoder", "decoder"):
            part = getattr(self, name)
            table = part.pos_embed_max_size if part is not None else None
            if table is not None and table < self.latent_size // part.patch_size:
                raise ValueError(f"{name}.pos_embed_max_size {table} is smaller than the "
                                 f"{self.latent_size // part.patch_size}-patch grid of image_size {self.image_size}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent.factor


class SelftokTokenizer(nn.Module):
    """Encoder + quantizer + optional diffusion decoder + optional renderer (see the module docstring)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = TokenSchedule(cfg.schedule)
        K, C, L = cfg.schedule.K, cfg.latent.channels, cfg.latent_size
        self.encoder = QFormerEncoder(cfg.encoder, K, C, L)
        self.quantizer = CosineQuantizer(cfg.quantizer, cfg.encoder.query_dim, K)
        D = cfg.quantizer.vector_dim
        self.decoder = MMDiT(cfg.decoder, K, C, D, L) if cfg.decoder is not None else None
        self.renderer = Renderer(cfg.renderer, K, C, D, L) if cfg.renderer is not None else None
        # the SD3 VAE is external (loaded lazily from latent.path); a learned autoencoder is a submodule whose
        # weights are the tokenizer's (``latents.*``)
        self.latents = build_latent_adapter(cfg.latent)

    @property
    def K(self) -> int:
        return self.cfg.schedule.K

    @property
    def codebook_size(self) -> int:
        return self.cfg.quantizer.codebook_size

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) float in [0, 1] → codes (B, K) int64 in encoder order."""
        return self.encode_latents(self.latents.encode(images))

    @torch.no_grad()
    def encode_latents(self, latents: Tensor) -> Tensor:
        """latents: (B, C, H, W) in the adapter's latent space → codes (B, K) int64 in encoder order."""
        features = self.encoder(self._check_latents(latents))
        return self.quantizer.lookup(self.quantizer.normalized_inputs(features))

    @torch.no_grad()
    def quantize_latents(self, latents: Tensor) -> QuantizerOutput:
        """Like `encode_latents`, also returning the code vectors the decoder receives (B, K, D)."""
        features = self.encoder(self._check_latents(latents))
        indices = self.quantizer.lookup(self.quantizer.normalized_inputs(features))
        return QuantizerOutput(self.quantizer.codes_to_vectors(indices), indices, features.new_zeros(()), {})

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """codes: (B, K) int → post-normed code vectors (B, K, D) float32 (the decoders' context)."""
        return self.quantizer.codes_to_vectors(self._check_codes(codes))

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, codes: Tensor | None = None, steps: int = 50, generator: torch.Generator | None = None,
               size: tuple[int, int] | None = None, vectors: Tensor | None = None) -> Tensor:
        """codes (B, K) → images (B, 3, H, W) in [0, 1] with the `steps`-step diffusion decoder.

        `size` = output (H, W) in pixels (default image_size); the noise is drawn from `generator`. Instead of
        `codes`, the code vectors (B, K, D) may be given (`vectors`, e.g. `codes_to_vectors` or
        `quantize_latents(...).vectors`)."""
        latent_hw = None
        if size is not None:
            f = self.cfg.latent.factor
            if size[0] % f or size[1] % f:
                raise ValueError(f"output size {size} is not divisible by the latent factor {f}")
            latent_hw = (size[0] // f, size[1] // f)
        vectors = self._context(codes, vectors)
        self.latents.prepare(vectors.device)
        return self.latents.decode(self.decode_latents(steps=steps, generator=generator, latent_hw=latent_hw,
                                                       vectors=vectors))

    @torch.no_grad()
    def decode_latents(self, codes: Tensor | None = None, steps: int = 50,
                       generator: torch.Generator | None = None, noise: Tensor | None = None,
                       latent_hw: tuple[int, int] | None = None, vectors: Tensor | None = None) -> Tensor:
        """codes (B, K) (or their vectors (B, K, D)) → latents (B, C, h, w) float32 by Euler sampling from
        `noise` (default: randn).

        At step i only the first ``k_i + 1`` tokens are visible (official float32 schedule), and only they
        are computed; the per-token modulations are computed once for all steps."""
        decoder = self._require("decoder")
        vectors = self._context(codes, vectors)
        B, dtype = vectors.shape[0], decoder.x_embedder.proj.weight.dtype
        if noise is None:
            h, w = latent_hw or (self.cfg.latent_size, self.cfg.latent_size)
            noise = torch.randn(B, self.cfg.latent.channels, h, w, generator=generator, device=vectors.device)
        elif noise.shape[0] != B or noise.shape[1] != self.cfg.latent.channels:
            raise ValueError(f"noise must have shape ({B}, {self.cfg.latent.channels}, h, w), got {tuple(noise.shape)}")
        decoder.check_latent_size(*noise.shape[-2:])
        vectors = vectors.to(dtype)
        token_mods = decoder.token_modulations()

        def velocity(x: Tensor, t: Tensor, num_visible: int) -> Tensor:
            return decoder(x.to(dtype), t, vectors[:, :num_visible], None, token_mods)

        grid = self.schedule.sampler_grid(steps, device=vectors.device)
        return euler_sample(velocity, noise, grid, self.cfg.flow.shift)

    @torch.no_grad()
    def render(self, codes: Tensor | None = None, vectors: Tensor | None = None) -> Tensor:
        """codes (B, K) (or their vectors (B, K, D)) → images (B, 3, image_size, image_size) in [0, 1] with
        the one-step renderer."""
        vectors = self._context(codes, vectors)
        self.latents.prepare(vectors.device)
        return self.latents.decode(self.render_latents(vectors=vectors))

    @torch.no_grad()
    def render_latents(self, codes: Tensor | None = None, vectors: Tensor | None = None) -> Tensor:
        """codes (B, K) (or their vectors (B, K, D)) → predicted clean latents (B, C, h, w) float32 (one
        renderer pass)."""
        renderer = self._require("renderer")
        vectors = self._context(codes, vectors).to(renderer.positional_embedding.dtype)
        return renderer(vectors).float()

    # ------------------------------------------------------------------ dtype, save / load
    def cast_for_inference(self, dtype: torch.dtype) -> SelftokTokenizer:
        """Cast encoder, decoder and renderer weights to `dtype`; the quantizer (codebook) stays float32."""
        for part in (self.encoder, self.decoder, self.renderer):
            if part is not None:
                part.to(dtype)
        return self

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write ``model.safetensors`` and ``config.yaml`` (enough to rebuild with `from_pretrained`).
        `dtype` (e.g. torch.float16) stores the floating-point tensors in it, half the file; loading casts
        them back to the model's own dtypes."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
                 for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "library": "selftok"})
        tmp.replace(directory / WEIGHTS_NAME)
        save_config(self.cfg, directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, vae_path: str | None = None,
                        device: torch.device | str = "cpu") -> SelftokTokenizer:
        """Load a directory written by `save_pretrained` (strict: every tensor must match)."""
        from safetensors.torch import load_file
        directory = Path(directory)
        cfg = load_config(TokenizerConfig, directory / CONFIG_NAME)
        if vae_path is not None:
            cfg.latent.path = vae_path
        weights = directory / WEIGHTS_NAME
        try:
            state = load_file(str(weights), device=str(device))
        except Exception as e:  # safetensors raises its own error type for truncated / foreign files
            raise ValueError(f"cannot read {weights}: {e} (missing, truncated or not a safetensors file)") from e
        if cfg.latent.kind == "autoencoder" and not any(k.startswith("latents.") for k in state):
            raise ValueError(f"{weights} has no learned autoencoder (no latents.* tensors) but its config.yaml says "
                             f"latent.kind: autoencoder")
        return cls.from_state_dict(cfg, state)

    @classmethod
    def from_state_dict(cls, cfg: TokenizerConfig, state: dict[str, Tensor]) -> SelftokTokenizer:
        """Build `cfg` without initialising weights and load `state` strictly (errors name every bad key)."""
        with torch.device("meta"):
            model = cls(cfg)
        check_state_dict(model, state)
        own = model.state_dict()  # a file stored in another float dtype computes in the model's own dtypes
        state = {k: v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v
                 for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def _require(self, name: str) -> nn.Module:
        part = getattr(self, name)
        if part is None:
            other = "render()" if name == "decoder" else "decode()"
            raise ValueError(f"this tokenizer has no {name} (its config sets {name}: null); use {other}")
        return part

    def _context(self, codes: Tensor | None, vectors: Tensor | None) -> Tensor:
        """The decoders' context: code vectors (B, K, D) float32 from exactly one of `codes` and `vectors`."""
        if (codes is None) == (vectors is None):
            raise ValueError("give exactly one of codes (B, K) and vectors (B, K, D)")
        if codes is not None:
            return self.codes_to_vectors(codes)
        D = self.cfg.quantizer.vector_dim
        if not isinstance(vectors, Tensor) or vectors.dim() != 3 or tuple(vectors.shape[1:]) != (self.K, D):
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ValueError(f"vectors must have shape (B, {self.K}, {D}), got {shape}")
        if not vectors.dtype.is_floating_point:
            raise ValueError(f"vectors must be floating point (indices go in codes), got {vectors.dtype}")
        return vectors.float()

    def _check_codes(self, codes: Tensor) -> Tensor:
        if not isinstance(codes, Tensor) or codes.dim() != 2:
            raise ValueError(f"codes must be a (B, K) integer tensor, got "
                             f"{tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__}")
        if codes.shape[1] != self.K:
            raise ValueError(f"codes have {codes.shape[1]} tokens per image but this tokenizer's schedule has "
                             f"K = {self.K}")
        self.quantizer.check_indices(codes)
        return codes

    def _check_latents(self, latents: Tensor) -> Tensor:
        C = self.cfg.latent.channels
        if not isinstance(latents, Tensor) or latents.dim() != 4 or latents.shape[1] != C:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape (B, {C}, H, W) for the {self.cfg.latent.kind} latent space, "
                             f"got {shape}")
        if not latents.dtype.is_floating_point:
            raise ValueError(f"latents must be floating point, got {latents.dtype}")
        self.encoder.check_latent_size(*latents.shape[-2:])
        return latents.to(self.encoder.query_tokens.dtype)


def check_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Raise a KeyError/ValueError listing missing, unexpected and mis-shaped tensors (nothing is dropped)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped: {'; '.join(shapes)}")
    if problems:
        raise ValueError("state dict does not match the model: " + " | ".join(problems))
