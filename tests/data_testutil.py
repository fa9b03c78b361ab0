"""Helpers for the data / pre-tokenization tests: small image files and a corpus of bad inputs."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def bomb_png(w: int, h: int) -> bytes:
    """A valid-looking PNG whose header claims w×h pixels (only the header is ever read)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def corrupt_png() -> bytes:
    """A PNG with a valid header whose compressed pixel data is overwritten with junk."""
    data = bytearray(encode(noise_image(32, 32, 8)))
    start = data.index(b"IDAT") + 20
    data[start:start + 200] = bytes(200)
    return bytes(data)


def bad_corpus() -> list[tuple[str, bytes, list[str] | None, str | None]]:
    """(file name, bytes, captions, expected reject kind or None) covering every bad-input case of issue 5.

    Rejections assume the default transform policies at image_size 16, `small_images="reject"` and
    `missing_caption="skip"`."""
    rgba = noise_image(20, 20, 1, "RGBA")
    palette = Image.new("P", (20, 20))
    palette.putpalette([255, 0, 0, 0, 255, 0] * 128)
    palette.info["transparency"] = 0
    cmyk = Image.new("CMYK", (24, 20), (0, 255, 255, 0))
    gray16 = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    good = encode(noise_image(24, 18, 2))
    return [
        ("good.png", good, ["a good image", "another caption"], None),
        ("good.jpg", encode(noise_image(32, 16, 3), "JPEG"), ["jpeg"], None),
        ("gray.png", encode(noise_image(20, 20, 4, "L")), ["gray"], None),
        ("gray16.png", encode(gray16), ["sixteen bit"], None),
        ("cmyk.jpg", encode(cmyk, "JPEG"), ["cmyk"], None),
        ("rgba.png", encode(rgba), ["rgba"], None),
        ("palette.png", encode(palette), ["palette"], None),
        ("garbage.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, ["garbage"], "not_an_image"),
        ("corrupt.png", corrupt_png(), ["corrupt"], "corrupt"),
        ("truncated.png", encode(noise_image(32, 32, 5))[:-200], ["truncated png"], "truncated"),
        ("truncated.jpg", encode(noise_image(32, 32, 6), "JPEG")[:300], ["truncated jpeg"], "truncated"),
        ("zero.png", b"", ["zero"], "empty"),
        ("text.jpg", b"this is not an image at all\n" * 10, ["text"], "not_an_image"),
        ("tiny.png", encode(noise_image(8, 30, 7)), ["tiny"], "too_small"),
        ("bomb.png", bomb_png(30000, 30000), ["bomb"], "too_large"),
        ("nocaption.png", good, None, "missing_caption"),
        ("emptycaption.png", good, [], "missing_caption"),
    ]


def write_imagefolder(directory: Path, corpus=None) -> Path:
    """The corpus as an imagefolder with metadata.jsonl (caption column holds a list of strings)."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = bad_corpus() if corpus is None else corpus
    with open(directory / "metadata.jsonl", "w") as f:
        for name, data, captions, _ in corpus:
            (directory / name).write_bytes(data)
            f.write(json.dumps({"file_name": name, "caption": captions}) + "\n")
    return directory
