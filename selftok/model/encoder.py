"""The dual-stream Q-Former encoder (official ``QformerEncoder`` in ``'dual'`` mode, uni-directional).

Two streams run side by side through `depth` blocks:
* the image stream ``x`` (B, N, h): patch-embedded latent plus a frozen, centre-cropped 2-D sin-cos table;
  each block is a plain pre-LN ViT block (no modulation, no gating);
* the query stream ``q`` (B, K, q): K learned queries. Each block attends from the queries over
  ``[image keys/values projected from the normed image stream ; query keys/values]`` (queries see every image
  token and every query; the image never sees the queries), with a per-token AdaLN-Zero whose modulation
  comes from the timestep embedding of the token position ``1000 + 8k`` (each block has its own embedder).

The encoder output is the final query stream (B, K, q); the quantizer turns it into codes. The last block's
image stream feeds nothing, so it is not built (its official tensors are listed as ignored by the loader).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selftok.model.layers import (
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    checkpoint,
    crop_pos_embed,
    layer_norm,
    modulate,
    sincos_2d,
    token_positions,
)


@dataclass
class EncoderConfig:
    """Sizes of the dual-stream Q-Former encoder. Defaults: official ``Enc-Qformer-Uni-XL/2``."""

    patch_size: int = 2
    """Latent pixels per patch side."""
    hidden_size: int = 64
    """Width of the image stream."""
    num_heads: int = 4
    """Heads of the image-stream self-attention."""
    depth: int = 16
    """Number of dual blocks."""
    query_dim: int = 512
    """Width of the query stream (the quantizer's input width)."""
    query_heads: int = 8
    """Heads of the query attention."""
    mlp_ratio: float = 4.0
    """MLP hidden width / stream width (both streams)."""
    pos_embed_max_size: int | None = None
    """Side (in patches) of the frozen position table; None = twice the latent side, as the official
    encoder builds it. Latent patch grids up to this size are accepted (centre crop)."""

    def __post_init__(self) -> None:
        for name in ("patch_size", "hidden_size", "num_heads", "depth", "query_dim", "query_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"encoder.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"encoder.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.query_dim % self.query_heads:
            raise ValueError(f"encoder.query_dim {self.query_dim} is not divisible by query_heads {self.query_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"encoder.hidden_size must be a multiple of 4 (2-D sin-cos table), got {self.hidden_size}")


class DualAttention(nn.Module):
    """Image self-attention plus query attention over [image; queries]. qkv layout (B, L, 3, H, head_dim)."""

    def __init__(self, dim: int, num_heads: int, query_dim: int, query_heads: int, image_stream: bool):
        super().__init__()
        self.num_heads, self.query_heads = num_heads, query_heads
        if image_stream:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
        self.to_query_kv = nn.Linear(dim, 2 * query_dim)
        self.query_linear = nn.Linear(query_dim, 3 * query_dim)
        self.query_proj = nn.Linear(query_dim, query_dim)
        self.image_stream = image_stream

    def forward(self, xn: Tensor, qn: Tensor) -> tuple[Tensor | None, Tensor]:
        """xn: (B, N, h) normed image stream; qn: (B, K, q) normed, modulated queries.
        Returns: image attention output (B, N, h) or None without an image stream, query output (B, K, q)."""
        B, N, h = xn.shape
        K, qd = qn.shape[1], qn.shape[2]
        x_out = None
        if self.image_stream:
            q, k, v = self.qkv(xn).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            x_out = self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, h))
        k_img, v_img = self.to_query_kv(xn).reshape(B, N, 2, self.query_heads, -1).permute(2, 0, 3, 1, 4)
        qq, kq, vq = self.query_linear(qn).reshape(B, K, 3, self.query_heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(qq, torch.cat([k_img, kq], dim=2), torch.cat([v_img, vq], dim=2))
        return x_out, self.query_proj(out.transpose(1, 2).reshape(B, K, qd))


class DualBlock(nn.Module):
    """One dual block: pre-LN ViT block on the image stream, modulated + gated block on the queries."""

    def __init__(self, cfg: EncoderConfig, image_stream: bool = True):
        super().__init__()
        h, qd = cfg.hidden_size, cfg.query_dim
        self.attn = DualAttention(h, cfg.num_heads, qd, cfg.query_heads, image_stream)
        if image_stream:
            self.mlp = Mlp(h, int(h * cfg.mlp_ratio))
        self.q_mlp = Mlp(qd, int(qd * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(qd, 6 * qd))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        # fresh models start with open gates (bias 1 on gate_a and gate_m): with AdaLN-Zero gates the encoder
        # output is the same for every image, the decoder cannot tell images apart and neither side gets a
        # first-order signal to change that (a long plateau at the mean image). Official weights overwrite it.
        for chunk in (2, 5):
            nn.init.ones_(self.adaLN_modulation[-1].bias[chunk * qd:(chunk + 1) * qd])
        self.t_embedder = TimestepEmbedder(qd)
        self.image_stream = image_stream

    def token_modulation(self, num_tokens: int, device: torch.device) -> Tensor:
        """Per-token AdaLN parameters from the position embedding of 1000+8k: (K, 6q), batch independent."""
        return self.adaLN_modulation(self.t_embedder(token_positions(num_tokens, device)))

    def forward(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, N, h) image stream; q: (B, K, q) queries. Returns the updated (x, q)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.token_modulation(q.shape[1], q.device).chunk(6, dim=1)
        xn = layer_norm(x)
        x_attn, q_attn = self.attn(xn, modulate(layer_norm(q), shift_a[None], scale_a[None]))
        if self.image_stream:
            x = x + x_attn
            x = x + self.mlp(layer_norm(x))
        q = q + gate_a[None] * q_attn
        q = q + gate_m[None] * self.q_mlp(modulate(layer_norm(q), shift_m[None], scale_m[None]))
        return x, q


class QFormerEncoder(nn.Module):
    """Latent (B, C, H, W) → K query features (B, K, query_dim)."""

    def __init__(self, cfg: EncoderConfig, num_tokens: int, in_channels: int, latent_size: int):
        super().__init__()
        self.cfg = cfg
        self.num_tokens = num_tokens
        self.grid = cfg.pos_embed_max_size or 2 * latent_size
        self.x_embedder = PatchEmbed(in_channels, cfg.hidden_size, cfg.patch_size)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # frozen (official: a requires_grad=False parameter); a buffer keeps it out of optimizers
        self.register_buffer("pos_embed", sincos_2d(cfg.hidden_size, self.grid).unsqueeze(0))
        self.query_tokens = nn.Parameter(torch.randn(1, num_tokens, cfg.query_dim) * 0.02)
        self.blocks = nn.ModuleList(
            [DualBlock(cfg, image_stream=i < cfg.depth - 1) for i in range(cfg.depth)])
        self.gradient_checkpointing = False

    def check_latent_size(self, h: int, w: int) -> None:
        """Raise a ValueError naming the problem if an h×w latent cannot be encoded."""
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the encoder patch size {p}")
        if h // p > self.grid or w // p > self.grid:
            raise ValueError(f"latent size {h}x{w} gives a {h // p}x{w // p} patch grid, larger than the "
                             f"encoder's {self.grid}x{self.grid} position table (max latent {self.grid * p}px)")

    def forward(self, latents: Tensor) -> Tensor:
        """latents: (B, C, H, W) → query features (B, K, query_dim)."""
        h, w = latents.shape[-2:]
        self.check_latent_size(h, w)
        p = self.cfg.patch_size
        x = self.x_embedder(latents) + crop_pos_embed(self.pos_embed, self.grid, h // p, w // p)
        q = self.query_tokens.expand(latents.shape[0], -1, -1)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, q = checkpoint(block, x, q)
            else:
                x, q = block(x, q)
        return q
