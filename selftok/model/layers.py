"""Building blocks shared by the encoder, the MMDiT decoder and the renderer.

Everything here reproduces the official Selftok numerics in float32 (the sinusoid arguments are built in
float32 like the official code; the fixed sin-cos tables in float64 and then cast), so that official
weights give the same outputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

#: LayerNorm epsilon used everywhere in Selftok.
LN_EPS = 1e-6

_EXPLICIT_ATTENTION = contextvars.ContextVar("selftok_explicit_attention", default=False)


@contextlib.contextmanager
def explicit_attention() -> Iterator[None]:
    """Within this context `attention` runs as plain matmul + softmax in the inputs' dtype (bf16 under
    autocast) instead of torch's SDPA. For CPU training: on these 32-160-key sequences torch's fused CPU
    flash-attention backward costs ~6x its forward, and SDPA's math backend upcasts bf16 inputs to fp32 and
    adds a fully-masked-row check (`_safe_softmax`); this is 2-2.5x faster than the math backend per call,
    forward + backward (docs/tokenizer_training.md, "Speed"). Training only: inference keeps SDPA, whose
    float32 outputs match the official implementation."""
    token = _EXPLICIT_ATTENTION.set(True)
    try:
        yield
    finally:
        _EXPLICIT_ATTENTION.reset(token)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on (B, H, L, head_dim) tensors; mask: (B, 1, Lq, Lk) bool, True = may
    attend. Torch's SDPA, or inside `explicit_attention` the same function as matmul + softmax; there a query
    row that may attend nothing averages all values instead of giving zeros (finite either way; such rows are
    the context rows of a sample without visible tokens, whose outputs nothing reads)."""
    if not _EXPLICIT_ATTENTION.get():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1, dtype=scores.dtype) @ v


def checkpoint(block: nn.Module, *args):
    """Non-reentrant activation checkpointing of `block(*args)` whose recomputation (during backward, outside
    the forward's contexts) runs the same attention as the forward did."""
    explicit = _EXPLICIT_ATTENTION.get()

    def contexts():
        return contextlib.nullcontext(), (explicit_attention() if explicit else contextlib.nullcontext())

    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, context_fn=contexts)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation ``x·(1+scale)+shift``; `shift`/`scale` broadcast against `x` (caller unsqueezes)."""
    return x * (1 + scale) + shift


def layer_norm(x: Tensor) -> Tensor:
    """Non-affine LayerNorm over the last dim with the Selftok epsilon."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2 (the ViT / SD3 MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def timestep_sinusoid(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """GLIDE/DiT sinusoid ``[cos(t·f_i), sin(t·f_i)]`` with ``f_i = exp(-ln(max_period)·i/(dim/2))``.

    Args: t: (N,) times or positions (any dtype; computed in float32 as the official code does).
    Returns: (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid of a scalar (diffusion time ×1000, or a token position 1000+8k) → Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: Tensor) -> Tensor:
        """t: (N,) → (N, hidden_size). The sinusoid is built in float32, then cast to the weights' dtype."""
        return self.mlp(timestep_sinusoid(t, self.frequency_size).to(self.mlp[0].weight.dtype))


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """MAE-style 1-D table ``[sin(p·ω_i), cos(p·ω_i)]``, ``ω_i = 10000^(-i/(dim/2))``, built in float64.

    Args: positions: (M,) float. Returns: (M, dim) float64."""
    assert dim % 2 == 0
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """2-D table on a ``grid_size²`` grid (row-major), first half of the channels encodes the column index,
    second half the row index (the official DiT/MAE layout). Returns: (grid_size², dim) float32 on the CPU
    (fixed tables are built on the CPU even while a model is constructed on the meta device)."""
    coords = torch.arange(grid_size, dtype=torch.float32, device="cpu")
    col = coords[None, :].expand(grid_size, grid_size)
    row = coords[:, None].expand(grid_size, grid_size)
    emb = torch.cat([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], dim=1)
    return emb.float()


def token_positions(num_tokens: int, device: torch.device | None = None) -> Tensor:
    """Pseudo-timesteps ``1000 + 8k`` that tell token positions apart (official ``DiTi.get_position``)."""
    return 1000 + 8 * torch.arange(num_tokens, device=device)


class PatchEmbed(nn.Module):
    """Conv2d patchifier: (B, C, H, W) → (B, (H/p)·(W/p), D), row-major patches."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def crop_pos_embed(table: Tensor, grid: int, h: int, w: int) -> Tensor:
    """Centre crop of a (1, grid², D) position table to an h×w patch grid (offset ``(grid - h)//2``).

    Returns: (1, h·w, D)."""
    if h > grid or w > grid:
        raise ValueError(f"a {h}x{w} patch grid exceeds the {grid}x{grid} position table")
    top, left = (grid - h) // 2, (grid - w) // 2
    spatial = table.reshape(1, grid, grid, table.shape[-1])[:, top:top + h, left:left + w, :]
    return spatial.reshape(1, h * w, table.shape[-1])


def unpatchify(x: Tensor, h: int, w: int, patch_size: int, channels: int) -> Tensor:
    """(B, h·w, p·p·C) patch tokens → (B, C, h·p, w·p)."""
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)
