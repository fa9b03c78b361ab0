"""Images for the tokenizer: the one image transform (the official one), robust decoding and the suffix list.

The transform is the official one (``Resize(S)`` on the short side with PIL bilinear, then ``CenterCrop(S)``,
exactly as torchvision computes them); pixels stay ``uint8`` until `ImageBatch.to_images` maps them to float
[0, 1] on the target device (the tokenizer maps [0, 1] to its own range).
"""
from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

log = logging.getLogger(__name__)

#: Pillow's default decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
PILLOW_MAX_PIXELS = 89_478_485

# ------------------------------------------------------------------------------------------------ configs
@dataclasses.dataclass
class TransformConfig:
    """How an image file becomes S×S RGB pixels."""

    image_size: int = 256
    """S: the short side is resized to S (PIL bilinear), then the centre S×S crop is taken."""
    small_images: Literal["upscale", "reject"] = "upscale"
    """Images whose short side is below S: upscale them (the official transform does) or reject them."""
    min_side: int = 1
    """Reject images whose short side is below this many pixels, whatever `small_images` says."""
    alpha: Literal["white", "black", "drop", "reject"] = "white"
    """Images with transparency (RGBA, LA, palette/RGB with a transparent colour): composite over white or
    black, drop the alpha channel, or reject them. Fully opaque alpha channels are simply dropped."""
    max_pixels: int = PILLOW_MAX_PIXELS
    """Reject images with more pixels than this before decoding them (decompression-bomb guard)."""
    exif_transpose: bool = True
    """Apply the EXIF orientation tag before cropping."""

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.min_side < 1 or self.max_pixels < 1:
            raise ValueError("image_size, min_side and max_pixels must be positive")

    def describe(self) -> dict[str, Any]:
        """The transform as recorded in a token-shard manifest."""
        return {"resize": "short_side_bilinear", "crop": "center", "range": "[0,1]",
                **dataclasses.asdict(self)}


# ------------------------------------------------------------------------------------------------ decoding
class Rejected(Exception):
    """An input that cannot become a training image; ``str(e)`` is ``"<kind>: <detail>"``."""


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully, or raise Rejected (empty, not an image, too large, corrupt or truncated)."""
    if not data:
        raise Rejected("empty: zero-byte file")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own size check below replaces Pillow's, before any pixel is decoded
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise Rejected(f"not_an_image: unidentified format ({len(data)} bytes)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on corrupt headers
        raise _decode_error(e) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    w, h = image.size
    if w * h > max_pixels:
        raise Rejected(f"too_large: {w}x{h} = {w * h} pixels exceeds max_pixels {max_pixels} (decompression bomb guard)")
    try:
        image.load()
    except Exception as e:  # noqa: BLE001
        raise _decode_error(e) from None
    return image


def _decode_error(e: Exception) -> Rejected:
    kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
    return Rejected(f"{kind}: {type(e).__name__}: {e}")


def to_rgb(image: Image.Image, alpha: str) -> Image.Image:
    """Any Pillow mode → RGB: 16/32-bit grayscale rescaled to 8 bit, CMYK/YCbCr/palette converted, and
    transparency handled by the `alpha` policy (white / black background, drop, or Rejected)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 16-bit range 0..65535 → 0..255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        image = image.convert("RGBA")
        a = np.asarray(image.getchannel("A"))
        if a.min(initial=255) < 255:
            if alpha == "reject":
                raise Rejected("alpha: image has transparent pixels (transform.alpha = reject)")
            if alpha in ("white", "black"):
                background = Image.new("RGBA", image.size, (255, 255, 255, 255) if alpha == "white" else (0, 0, 0, 255))
                image = Image.alpha_composite(background, image)
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` (short side, PIL bilinear) then ``CenterCrop(size)``, same integer rounding."""
    w, h = image.size
    if min(w, h) != size:
        if w <= h:
            w, h = size, int(size * h / w)
        else:
            w, h = int(size * w / h), size
        image = image.resize((w, h), Image.BILINEAR)
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def prepare_image(image: Image.Image, cfg: TransformConfig) -> Tensor:
    """A decoded image → (3, S, S) ``uint8`` tensor by the configured policies and the official transform."""
    if cfg.exif_transpose:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as e:  # noqa: BLE001 - malformed EXIF must not stop the run
            log.debug("ignoring unreadable EXIF orientation: %s", e)
    w, h = image.size
    if min(w, h) < cfg.min_side:
        raise Rejected(f"too_small: {w}x{h} is below min_side {cfg.min_side}")
    if min(w, h) < cfg.image_size and cfg.small_images == "reject":
        raise Rejected(f"too_small: {w}x{h} is smaller than the {cfg.image_size}px crop (transform.small_images = reject)")
    rgb = resize_center_crop(to_rgb(image, cfg.alpha), cfg.image_size)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_image(data: bytes, cfg: TransformConfig) -> Tensor:
    """Image file bytes → (3, S, S) ``uint8``; raises Rejected with the reason."""
    image = open_image(data, cfg.max_pixels)
    try:
        return prepare_image(image, cfg)
    except Rejected:
        raise
    except Exception as e:  # noqa: BLE001 - odd modes or broken palettes
        raise Rejected(f"corrupt: cannot convert {image.mode} image: {type(e).__name__}: {e}") from None
