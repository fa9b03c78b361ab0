"""Initialise the decoder's image stream from Stable Diffusion 3 (medium) MMDiT weights (official recipe).

The official trainer loads ``sd3_medium.safetensors`` (prefix ``model.diffusion_model.``) into the decoder,
taking every tensor whose name and shape match except the context stream: SD3's ``context_block`` weights
(text tokens) and ``context_embedder`` (4096 → D) are not loaded, so the whole token stream is trained from
scratch, and ``y_embedder`` (pooled text) does not exist here. The decoder keeps SD3's names, so the mapping
is the identity on the loaded names:

    model.diffusion_model.x_embedder.*                  → x_embedder.*
    model.diffusion_model.pos_embed                     → pos_embed  (centre-cropped if the decoder's table is smaller)
    model.diffusion_model.t_embedder.*                  → t_embedder.*
    model.diffusion_model.joint_blocks.{i}.x_block.*    → joint_blocks.{i}.x_block.*
    model.diffusion_model.final_layer.*                 → final_layer.*

Every decoder tensor of those groups must be present with the right shape (errors name each problem);
everything else in the file (context stream, pooled embedder, VAE, text encoders) is deliberately ignored.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SD3_PREFIX = "model.diffusion_model."
#: Decoder tensors taken from SD3 (regular expressions on decoder names).
LOADED = (r"x_embedder\..*", r"pos_embed", r"t_embedder\..*", r"joint_blocks\.\d+\.x_block\..*", r"final_layer\..*")
#: SD3 tensors deliberately not loaded, with the reason.
IGNORED = ((r"joint_blocks\.\d+\.context_block\..*", "token stream is trained from scratch (official)"),
           (r"context_embedder\..*", "SD3 embeds 4096-d text features; Selftok embeds code vectors"),
           (r"y_embedder\..*", "pooled text embedder; the Selftok decoder has none"))


def _crop_table(table: Tensor, side: int) -> Tensor:
    """Centre crop of a (1, G², D) position table to (1, side², D) (the official runtime crop)."""
    grid = round(table.shape[1] ** 0.5)
    top = (grid - side) // 2
    t = table.reshape(1, grid, grid, -1)[:, top:top + side, top:top + side]
    return t.reshape(1, side * side, -1)


def map_sd3_state_dict(sd3: Mapping[str, Tensor], decoder: nn.Module) -> dict[str, Tensor]:
    """SD3 tensors (full file names) → decoder names, for the image-stream groups in `LOADED`.

    Raises ValueError listing every missing or mis-shaped tensor."""
    expected = {k: v for k, v in decoder.state_dict().items() if any(re.fullmatch(p, k) for p in LOADED)}
    out, problems = {}, []
    for name, target in expected.items():
        src = sd3.get(SD3_PREFIX + name)
        if src is None:
            problems.append(f"missing {SD3_PREFIX + name}")
            continue
        if name == "pos_embed" and src.shape != target.shape and src.dim() == 3 and src.shape[1] > target.shape[1]:
            src = _crop_table(src, round(target.shape[1] ** 0.5))
        if tuple(src.shape) != tuple(target.shape):
            problems.append(f"{name}: SD3 {tuple(src.shape)} vs decoder {tuple(target.shape)}")
            continue
        out[name] = src
    if problems:
        raise ValueError("SD3 MMDiT weights do not fit the decoder's image stream: " + "; ".join(problems))
    return out


def ignored_sd3_names(names: list[str]) -> dict[str, str]:
    """SD3 MMDiT names (under the prefix) that are not loaded, with the reason."""
    out = {}
    for full in names:
        if not full.startswith(SD3_PREFIX):
            continue
        name = full[len(SD3_PREFIX):]
        for pattern, reason in IGNORED:
            if re.fullmatch(pattern, name):
                out[full] = reason
    return out


def load_sd3_image_stream(decoder: nn.Module, path: str | Path) -> list[str]:
    """Load the image stream of `decoder` from a local SD3 ``.safetensors`` file (read lazily, only the
    needed tensors). Returns the decoder names that were loaded."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SD3 MMDiT weights not found at {path}")
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        wanted = {k for k in names if k.startswith(SD3_PREFIX) and any(
            re.fullmatch(p, k[len(SD3_PREFIX):]) for p in LOADED)}
        sd3 = {k: f.get_tensor(k) for k in wanted}
    mapped = map_sd3_state_dict(sd3, decoder)
    with torch.no_grad():
        state = decoder.state_dict()
        for name, value in mapped.items():
            state[name].copy_(value.to(state[name].dtype))
    log.info("SD3 init: loaded %d tensors, ignored %d (%s)", len(mapped), len(ignored_sd3_names(names)),
             ", ".join(sorted({r for r in ignored_sd3_names(names).values()})))
    return sorted(mapped)
