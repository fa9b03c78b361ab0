"""Image tensors to PIL images and contact-sheet grids (PNG output of generation and training previews)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) float images in [0, 1] (values outside are clipped) → N RGB PIL images."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got {tuple(images.shape)}")
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile same-sized images row by row (`ncols` per row, default ≈ √N) with `pad` pixels between."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError("image_grid needs images of one size")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    sheet = Image.new("RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        sheet.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def save_grid(images: Sequence[Image.Image], path: Path, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """`image_grid` saved as a PNG at `path` (its folder is created); returns the grid."""
    grid = image_grid(images, ncols, pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def pil_to_tensor(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images (any mode) → (N, 3, size, size) float in [0, 1] (box-resized when `size` differs)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BOX)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0
