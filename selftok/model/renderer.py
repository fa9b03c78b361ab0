"""The one-step renderer (official ``MMDiT_Renderer``): code vectors → clean latent in one forward pass.

It is the MMDiT decoder without a noisy input: the image stream starts from a learned ``mask_token``
(shared over positions, or one per position) plus a learned ``positional_embedding`` (g², D), g = latent
side / patch size; the time embedding is fixed at t = 1000 (embedded as is). Every token is visible and the
context tokens attend only to each other (official ``context_see_xt`` left at False); image patches attend
to everything. The output is taken directly as the clean latent x̂0. It runs only at its configured latent
size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selftok.model.layers import sincos_2d, unpatchify
from selftok.model.mmdit import TokenConditionedTransformer, joint_attention_mask

#: The renderer's fixed time input (already on the 0–1000 scale).
RENDER_TIME = 1000.0


@dataclass
class RendererConfig:
    """Sizes of the renderer. Defaults: official ``MMDiT_XL_Renderer`` at 256 px."""

    depth: int = 24
    """Number of joint blocks."""
    num_heads: int = 24
    """Attention heads."""
    head_dim: int = 64
    """Width per head (model width = num_heads × head_dim)."""
    patch_size: int = 2
    """Latent pixels per output patch side."""
    mlp_ratio: float = 4.0
    """MLP hidden width / model width."""
    repeat_mask_token: bool = True
    """One mask token repeated over positions (official ``repeat: True``) or one per position."""

    def __post_init__(self) -> None:
        for name in ("depth", "num_heads", "head_dim", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"renderer.{name} must be positive, got {getattr(self, name)}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim


class Renderer(TokenConditionedTransformer):
    """Code vectors (B, K, D_c) → clean latent (B, C, H, W) at the configured latent size."""

    def __init__(self, cfg: RendererConfig, num_tokens: int, out_channels: int, context_dim: int,
                 latent_size: int):
        super().__init__(cfg, num_tokens, out_channels, context_dim)
        D = cfg.hidden_size
        if latent_size % cfg.patch_size:
            raise ValueError(f"latent size {latent_size} is not divisible by the renderer patch size {cfg.patch_size}")
        self.latent_size = latent_size
        self.grid = latent_size // cfg.patch_size
        # a fresh renderer starts from the 2-D sin-cos table (official init: D^-0.5·N(0, 1)); a smooth table lets
        # patches find the tokens that describe their neighbourhood from the first steps — with the random
        # init, fitting 32 shapes scenes stays at the mean image for ~150 steps, with sin-cos it is 6x lower
        # after 200 (docs/tokenizer_training.md). Official checkpoints overwrite it either way.
        self.positional_embedding = nn.Parameter(sincos_2d(D, self.grid))
        self.mask_token = nn.Parameter(D ** -0.5 * torch.randn(1, 1 if cfg.repeat_mask_token else self.grid ** 2, D))

    def forward(self, vectors: Tensor, token_mods: list[Tensor | None] | None = None) -> Tensor:
        """vectors: (B, K, D_c) code vectors in encoder order → (B, C, H, W) predicted clean latent."""
        B, K = vectors.shape[:2]
        if K != self.num_tokens:
            raise ValueError(f"the renderer takes all {self.num_tokens} tokens, got {K}")
        context = self.embed_context(vectors)
        x = (self.mask_token + self.positional_embedding).to(context.dtype).expand(B, -1, -1)
        c = self.t_embedder(torch.full((B,), RENDER_TIME, device=vectors.device))
        attn_mask = joint_attention_mask(None, K, x.shape[1], False, 1, x.device)  # (1, 1, L, L), broadcast
        out = self.run_blocks(context, x, c, token_mods, attn_mask)
        return unpatchify(out, self.grid, self.grid, self.cfg.patch_size, self.out_channels)
