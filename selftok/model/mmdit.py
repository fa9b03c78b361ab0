"""The token-conditioned MMDiT: SD3-style joint-attention transformer over [context tokens ; image patches].

Conventions: t ∈ [0, 1] with t = 1 pure noise; the time embedding sees ``1000·t``. The context is the K code
vectors (B, K, D_c) in encoder order, embedded by a Linear plus a fixed 1-D sin-cos table at positions
``1000 + 8k``. Each joint block has two streams:
* ``x_block`` (image): AdaLN-Zero from the diffusion-time embedding c;
* ``context_block`` (tokens): AdaLN-Zero from its own timestep embedder applied to the token positions —
  per-token, independent of the sample and of t (so it is computed once per decode, not per step). The
  last context block is pre-only (keys/values only) and takes its (shift, scale) from c.
Attention runs jointly over ``[context ; image]`` with a boolean key mask: image queries see the visible
tokens and every patch; context queries see the visible tokens and, if ``context_see_xt``, every patch.

Invisible tokens are never keys, and nothing reads their outputs, so the forward drops every token after the
last one visible in the batch (at late sampler steps most of the 512 tokens): same result, less compute.
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
    sincos_1d,
    sincos_2d,
    token_positions,
    unpatchify,
)


@dataclass
class MMDiTConfig:
    """Sizes of the diffusion decoder. Defaults: official ``MMDiT_XL`` (SD3-medium sized)."""

    depth: int = 24
    """Number of joint blocks."""
    num_heads: int = 24
    """Attention heads (official: = depth)."""
    head_dim: int = 64
    """Width per head; the model width is num_heads × head_dim (official 64 × depth = 1536)."""
    patch_size: int = 2
    """Latent pixels per patch side."""
    mlp_ratio: float = 4.0
    """MLP hidden width / model width."""
    pos_embed_max_size: int | None = None
    """Side (in patches) of the stored position table, centre-cropped to the patch grid (official 192);
    None = exactly the configured latent grid."""
    context_see_xt: bool = True
    """Context queries attend to the image patches (the official diffusion decoder passes True)."""

    def __post_init__(self) -> None:
        for name in ("depth", "num_heads", "head_dim", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % 4:
            raise ValueError(f"num_heads × head_dim = {self.hidden_size} must be a multiple of 4")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim


class AttentionProjections(nn.Module):
    """The qkv projection (and the output projection unless pre-only) of one stream."""

    def __init__(self, dim: int, pre_only: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)


class StreamBlock(nn.Module):
    """One stream of a joint block (official ``DismantledBlock``) with gated AdaLN.

    `token_adaln`: modulation from a per-block timestep embedder of the token positions (context stream);
    otherwise from the diffusion-time embedding c (image stream, and the pre-only last context block)."""

    def __init__(self, dim: int, mlp_ratio: float, pre_only: bool, token_adaln: bool):
        super().__init__()
        self.pre_only = pre_only
        self.token_adaln = token_adaln and not pre_only
        self.attn = AttentionProjections(dim, pre_only)
        if not pre_only:
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        if self.token_adaln:
            self.t_embedder = TimestepEmbedder(dim)

    def modulation(self, c: Tensor | None = None, num_tokens: int | None = None) -> Tensor:
        """Token modulation (1, K, n·D) from the positions, or time modulation (B, 1, n·D) from c (B, D)."""
        if self.token_adaln:
            return self.adaLN_modulation(self.t_embedder(token_positions(num_tokens, self.attn.qkv.weight.device)))[None]
        return self.adaLN_modulation(c)[:, None]

    def pre_attention(self, x: Tensor, mods: Tensor) -> Tensor:
        """x: (B, L, D) → qkv (B, L, 3D) of the modulated, normed stream."""
        shift, scale = mods.chunk(6 if not self.pre_only else 2, dim=-1)[:2]
        return self.attn.qkv(modulate(layer_norm(x), shift, scale))

    def post_attention(self, x: Tensor, attn: Tensor, mods: Tensor) -> Tensor:
        """Gated residual attention output and gated modulated MLP. x, attn: (B, L, D)."""
        _, _, gate_a, shift_m, scale_m, gate_m = mods.chunk(6, dim=-1)
        x = x + gate_a * self.attn.proj(attn)
        return x + gate_m * self.mlp(modulate(layer_norm(x), shift_m, scale_m))


class JointBlock(nn.Module):
    """A context stream and an image stream sharing one attention over [context ; image]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, pre_only_context: bool):
        super().__init__()
        self.num_heads = num_heads
        self.context_block = StreamBlock(dim, mlp_ratio, pre_only=pre_only_context, token_adaln=True)
        self.x_block = StreamBlock(dim, mlp_ratio, pre_only=False, token_adaln=False)

    def forward(self, context: Tensor, x: Tensor, c: Tensor, token_mod: Tensor | None,
                attn_mask: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """context: (B, K, D); x: (B, N, D); c: (B, D) time embedding; token_mod: (1, K, 6D) precomputed
        context modulation (None for the pre-only block); attn_mask: (B, 1, K+N, K+N) bool or None.
        Returns (context or None after the pre-only block, x)."""
        K, D = context.shape[1], context.shape[2]
        ctx_mod = token_mod if token_mod is not None else self.context_block.modulation(c=c)
        x_mod = self.x_block.modulation(c=c)
        ctx_qkv = self.context_block.pre_attention(context, ctx_mod)
        x_qkv = self.x_block.pre_attention(x, x_mod)
        last = self.context_block.pre_only
        q = (x_qkv if last else torch.cat([ctx_qkv, x_qkv], dim=1))[..., :D]  # the last block needs no context rows
        kv = torch.cat([ctx_qkv, x_qkv], dim=1)[..., D:]
        mask = attn_mask[:, :, K:] if (last and attn_mask is not None) else attn_mask
        out = joint_attention(q, kv[..., :D], kv[..., D:], self.num_heads, mask)
        if last:
            return None, self.x_block.post_attention(x, out, x_mod)
        return (self.context_block.post_attention(context, out[:, :K], ctx_mod),
                self.x_block.post_attention(x, out[:, K:], x_mod))


def joint_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, mask: Tensor | None) -> Tensor:
    """Multi-head SDPA on (B, L, D) tensors with heads split as (L, H, head_dim). mask: (B, 1, Lq, Lk) bool."""
    B, Lq, D = q.shape
    q, k, v = (t.reshape(B, t.shape[1], num_heads, D // num_heads).transpose(1, 2) for t in (q, k, v))
    out = attention(q, k, v, mask)
    return out.transpose(1, 2).reshape(B, Lq, D)


def joint_attention_mask(token_mask: Tensor | None, num_tokens: int, num_patches: int,
                         context_sees_image: bool, batch: int, device: torch.device) -> Tensor | None:
    """Boolean key mask (B, 1, K+N, K+N) for ``[context ; image]``, True = may attend; None if all True.

    Image rows see the visible tokens and every patch; context rows see the visible tokens and the patches
    only if `context_sees_image`. token_mask: (B, K) bool (True = visible) or None (all visible)."""
    if token_mask is None:
        if context_sees_image:
            return None
        token_mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    elif context_sees_image and bool(token_mask.all()):
        return None
    B, K, N = token_mask.shape[0], num_tokens, num_patches
    ones = torch.ones(B, N, dtype=torch.bool, device=device)
    ctx_rows = torch.cat([token_mask, ones if context_sees_image else ~ones], dim=1)
    img_rows = torch.cat([token_mask, ones], dim=1)
    return torch.cat([ctx_rows[:, None].expand(B, K, K + N), img_rows[:, None].expand(B, N, K + N)],
                     dim=1)[:, None]


def visible_prefix(mask: Tensor | None, num_tokens: int) -> int:
    """Number of leading tokens to keep: one past the last token visible in any sample (≥ 1)."""
    if mask is None:
        return num_tokens
    cols = mask.any(dim=0).nonzero()
    return int(cols.max()) + 1 if cols.numel() else 1


class TokenConditionedTransformer(nn.Module):
    """Parts shared by the diffusion decoder and the renderer: time embedder, context embedding, joint
    blocks, final layer. Subclasses provide the image-stream input."""

    def __init__(self, cfg: MMDiTConfig, num_tokens: int, out_channels: int, context_dim: int):
        """`cfg`: an MMDiTConfig or a RendererConfig (same size fields)."""
        super().__init__()
        D = cfg.hidden_size
        self.cfg = cfg
        self.num_tokens = num_tokens
        self.out_channels = out_channels
        self.t_embedder = TimestepEmbedder(D)
        self.context_embedder = nn.Linear(context_dim, D)
        self.register_buffer("context_pos_embed",
                             sincos_1d(D, token_positions(num_tokens, torch.device("cpu")).float()).float()[None])
        self.joint_blocks = nn.ModuleList(
            [JointBlock(D, cfg.num_heads, cfg.mlp_ratio, pre_only_context=i == cfg.depth - 1)
             for i in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, out_channels)
        self.gradient_checkpointing = False

    def token_modulations(self, num_tokens: int | None = None) -> list[Tensor | None]:
        """Per-block context modulations (1, K, 6D) — a function of the weights only; compute once per decode."""
        K = num_tokens or self.num_tokens
        return [None if b.context_block.pre_only else b.context_block.modulation(num_tokens=K)
                for b in self.joint_blocks]

    def embed_context(self, vectors: Tensor) -> Tensor:
        """Code vectors (B, K', D_c) (a prefix of the K tokens) → context stream (B, K', D)."""
        return self.context_embedder(vectors) + self.context_pos_embed[:, :vectors.shape[1]]

    def run_blocks(self, context: Tensor, x: Tensor, c: Tensor, token_mods: list[Tensor | None] | None,
                   attn_mask: Tensor | None) -> Tensor:
        """Joint blocks then the final layer: returns patch outputs (B, N, p·p·C)."""
        K = context.shape[1]
        mods = token_mods or [None] * len(self.joint_blocks)
        for block, mod in zip(self.joint_blocks, mods):
            if mod is None and not block.context_block.pre_only:
                mod = block.context_block.modulation(num_tokens=K)
            elif mod is not None:
                mod = mod[:, :K]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                context, x = checkpoint(block, context, x, c, mod, attn_mask)
            else:
                context, x = block(context, x, c, mod, attn_mask)
        return self.final_layer(x, c)


class FinalLayer(nn.Module):
    """LayerNorm, AdaLN (shift, scale) from c, Linear to p·p·C."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class MMDiT(TokenConditionedTransformer):
    """Rectified-flow velocity model v(x_t, t | codes, mask)."""

    def __init__(self, cfg: MMDiTConfig, num_tokens: int, in_channels: int, context_dim: int, latent_size: int):
        super().__init__(cfg, num_tokens, in_channels, context_dim)
        D, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.pos_embed_max_size or latent_size // p
        self.x_embedder = PatchEmbed(in_channels, D, p)
        # the official decoder loads SD3-medium's table; a fresh model starts from 2-D sin-cos
        self.register_buffer("pos_embed", sincos_2d(D, self.grid)[None])

    def check_latent_size(self, h: int, w: int) -> None:
        """Raise a ValueError naming the problem if an h×w latent cannot be decoded."""
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the decoder patch size {p}")
        if h // p > self.grid or w // p > self.grid:
            raise ValueError(f"latent size {h}x{w} gives a {h // p}x{w // p} patch grid, larger than the "
                             f"decoder's {self.grid}x{self.grid} position table")

    def forward(self, x_t: Tensor, t: Tensor, vectors: Tensor, mask: Tensor | None = None,
                token_mods: list[Tensor | None] | None = None) -> Tensor:
        """Predict the flow velocity.

        Args:
            x_t: (B, C, H, W) noisy latent; t: (B,) flow time in [0, 1], 1 = noise;
            vectors: (B, K, D_c) code vectors (encoder order); mask: (B, K) bool, True = visible, None = all;
            token_mods: `token_modulations()` computed once for these weights (optional).
        Returns: (B, C, H, W) velocity ≈ noise − x0."""
        H, W = x_t.shape[-2:]
        self.check_latent_size(H, W)
        p = self.cfg.patch_size
        keep = visible_prefix(mask, vectors.shape[1])
        vectors = vectors[:, :keep]
        mask = mask[:, :keep] if mask is not None else None
        x = self.x_embedder(x_t) + crop_pos_embed(self.pos_embed, self.grid, H // p, W // p)
        c = self.t_embedder(t * 1000.0)
        context = self.embed_context(vectors)
        attn_mask = joint_attention_mask(mask, keep, x.shape[1], self.cfg.context_see_xt, x.shape[0], x.device)
        out = self.run_blocks(context, x, c, token_mods, attn_mask)
        return unpatchify(out, H // p, W // p, p, self.out_channels)
