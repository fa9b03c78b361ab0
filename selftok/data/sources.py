"""Image data for the tokenizer: sources and a DataLoader.

Sources (`DataConfig.kind`), all loaded through `datasets` except the procedural shapes world:

* ``imagefolder`` — a folder of images with captions in ``metadata.jsonl`` / ``metadata.csv`` (``file_name``
  column); images without a metadata row are ignored by `datasets`.
* ``webdataset`` — ``.tar`` shards whose samples hold an image (``.jpg``/``.png``/…) and a ``.txt`` and/or
  ``.json`` caption (``json.caption`` selects a field of the JSON).
* ``parquet`` — Parquet files with an image column (a `datasets` Image struct of bytes/path, raw bytes, or a
  path) and caption column(s).
* ``shapes`` — the built-in shapes world (`selftok.shapes`), generated on the fly per index.

Every item is a `Sample` with a stable id, the image as a ``uint8`` (3, S, S) tensor (or None), all its captions
and optional JSON metadata. Nothing about a single input can crash a loop: unreadable, empty, corrupt or
truncated files, non-images, images above the decompression-bomb limit, images smaller than the crop (when the
policy rejects them), images with alpha (when the policy rejects them) and missing captions (when the policy
skips them) become a `Sample` whose `reject` names the reason; `collate_samples` drops them from the batch
and lists them in `ImageBatch.rejects`.

The transform and decoding are `selftok.data.images`; pixels stay ``uint8`` until `ImageBatch.to_images` maps
them to float [0, 1] on the target device (the tokenizer maps [0, 1] to its own range).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from selftok.data.images import Rejected, TransformConfig, decode_image, prepare_image
from selftok.runtime.io import IMAGE_SUFFIXES
from selftok.shapes import make_example, scene_spec

log = logging.getLogger(__name__)

AUTO_CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "prompt")


# ------------------------------------------------------------------------------------------------ configs
@dataclasses.dataclass
class ShapesSourceConfig:
    """The procedural shapes world as a source (`selftok.shapes.make_example`)."""

    split: str = "train"
    """Prompt split (train / heldout)."""
    n: int = 1000
    """Number of examples: indices 0 … n−1 of the (split, seed) stream."""
    seed: int = 0
    size: int = 64
    """Rendered image side in pixels (the transform then resizes to `transform.image_size` if different)."""

    def __post_init__(self) -> None:
        if self.n < 0 or self.size < 1:
            raise ValueError(f"shapes.n must be >= 0 and shapes.size >= 1, got {self.n}, {self.size}")


@dataclasses.dataclass
class DataConfig:
    """An image (or image–text) source plus the transform applied to its images."""

    kind: Literal["imagefolder", "webdataset", "parquet", "shapes"] = "shapes"
    path: str | None = None
    """imagefolder: the folder; webdataset / parquet: a folder (all ``*.tar`` / ``*.parquet`` in it), a file or
    a glob pattern (files are sorted). Unused for shapes."""
    split: str = "train"
    """Split name passed to `datasets` (imagefolder folders with train/ test/ subfolders)."""
    image_column: str | None = None
    """Column holding the image; None = ``image``, or the webdataset sample's image extension."""
    caption_columns: list[str] | None = None
    """Caption column(s), dotted for nested fields (``json.caption``); a column holding a list contributes all
    its strings. None = the first present of caption, captions, text, txt, prompt; [] = no captions."""
    id_column: str | None = None
    """Column holding a stable sample id. None = the file path relative to `path` (imagefolder), ``tar name /
    __key__`` (webdataset), ``row-<index>`` (parquet, index in sorted-file order), the example id (shapes)."""
    meta_columns: list[str] = dataclasses.field(default_factory=list)
    """Columns copied into the sample's JSON metadata (shapes: tag, spec and scene spec are always kept)."""
    missing_caption: Literal["keep", "skip"] = "keep"
    """An item without any non-empty caption: keep it with an empty caption list, or reject it."""
    limit: int | None = None
    """Use only the first `limit` items of the source."""
    cache_dir: str | None = None
    """`datasets` cache directory (None = the default ~/.cache/huggingface/datasets)."""
    shapes: ShapesSourceConfig = dataclasses.field(default_factory=ShapesSourceConfig)
    transform: TransformConfig = dataclasses.field(default_factory=TransformConfig)

    def __post_init__(self) -> None:
        if self.kind != "shapes" and not self.path:
            raise ValueError(f"data.path is required for kind {self.kind!r}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"data.limit must be >= 0, got {self.limit}")

    def describe(self) -> dict[str, Any]:
        """The source as recorded in a token-shard manifest (what identifies the inputs, not the cache)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("cache_dir", "transform")}
        if self.kind != "shapes":
            out.pop("shapes")
        return out


# ------------------------------------------------------------------------------------------------ samples
class Sample(NamedTuple):
    index: int                    # position in the source
    id: str                       # stable sample id
    pixels: Tensor | None         # (3, S, S) uint8, None when rejected
    captions: list[str]           # all non-empty captions (possibly none)
    meta: str | None              # JSON metadata or None
    reject: str | None            # "<kind>: <detail>" when the input was rejected


class Reject(NamedTuple):
    index: int
    source_id: str
    reason: str


class ImageSource(Dataset):
    """Map-style dataset of `Sample`s (decoding happens in `__getitem__`, i.e. in DataLoader workers)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._shapes = cfg.kind == "shapes"
        if self._shapes:
            self._ds, self._n = None, cfg.shapes.n
        else:
            self._ds = load_hf_source(cfg)
            self._n = len(self._ds)
            self._image_column = cfg.image_column or _default_image_column(self._ds, cfg.kind)
            self._caption_columns = _caption_columns(self._ds, cfg.caption_columns)
            for column in [self._image_column, *self._caption_columns, *cfg.meta_columns,
                           *([cfg.id_column] if cfg.id_column else [])]:
                if column.split(".")[0] not in self._ds.column_names:
                    raise ValueError(f"{cfg.path}: no column {column!r}; columns: {', '.join(self._ds.column_names)}")
            self._root = os.path.abspath(cfg.path)
        if cfg.limit is not None:
            self._n = min(self._n, cfg.limit)

    def __len__(self) -> int:
        return self._n

    @property
    def image_size(self) -> int:
        return self.cfg.transform.image_size

    def describe(self) -> dict[str, Any]:
        return {**self.cfg.describe(), "num_inputs": len(self)}

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self._n:
            raise IndexError(index)
        if self._shapes:
            return self._shapes_sample(index)
        row = self._ds[index]
        sample_id = self._sample_id(index, row)
        captions = _unique([c for column in self._caption_columns for c in _strings(_get(row, column))])
        meta = json.dumps({c: _get(row, c) for c in self.cfg.meta_columns}, default=str) if self.cfg.meta_columns else None
        if not captions and self.cfg.missing_caption == "skip":
            return Sample(index, sample_id, None, [], meta, "missing_caption: no non-empty caption")
        try:
            pixels = decode_image(self._image_bytes(row), self.cfg.transform)
        except Rejected as e:
            return Sample(index, sample_id, None, captions, meta, str(e))
        return Sample(index, sample_id, pixels, captions, meta, None)

    def _shapes_sample(self, index: int) -> Sample:

        s = self.cfg.shapes
        ex = make_example(s.split, index, s.seed, s.size)
        meta = json.dumps({"tag": ex.tag, "spec": ex.spec, "scene_spec": scene_spec(ex.scene),
                           "scene": json.loads(ex.scene.to_json())})
        captions = _unique([ex.caption, ex.prompt])
        try:
            return Sample(index, ex.id, prepare_image(ex.image, self.cfg.transform), captions, meta, None)
        except Rejected as e:
            return Sample(index, ex.id, None, captions, meta, str(e))

    def _image_bytes(self, row: dict[str, Any]) -> bytes:
        value = row[self._image_column]
        path = None
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"]
            path = value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            return bytes(value)
        elif isinstance(value, str):
            path = value if os.path.isabs(value) else os.path.join(self._root, value)
        if not path:
            raise Rejected(f"empty: no image in column {self._image_column!r}")
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise Rejected(f"unreadable: {e}") from None

    def _sample_id(self, index: int, row: dict[str, Any]) -> str:
        if self.cfg.id_column:
            return str(_get(row, self.cfg.id_column))
        if self.cfg.kind == "webdataset":
            return f"{Path(row['__url__']).name}/{row['__key__']}"
        value = row[self._image_column]
        if self.cfg.kind == "imagefolder" and isinstance(value, dict) and value.get("path"):
            return os.path.relpath(value["path"], self._root)
        return f"row-{index}"


def load_hf_source(cfg: DataConfig):
    """The `datasets.Dataset` behind an imagefolder / webdataset / parquet source, images left undecoded."""
    import datasets

    if cfg.kind == "imagefolder":
        if not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"data.path {cfg.path!r} is not a folder")
        ds = datasets.load_dataset("imagefolder", data_dir=cfg.path, split=cfg.split, cache_dir=cfg.cache_dir)
    else:
        files = source_files(cfg.path, "tar" if cfg.kind == "webdataset" else "parquet")
        ds = datasets.load_dataset(cfg.kind, data_files=files, split="train", cache_dir=cfg.cache_dir)
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def source_files(path: str, extension: str) -> list[str]:
    """Sorted files of a folder (``*.<extension>``), a glob pattern, or a single file."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, f"*.{extension}")))
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise FileNotFoundError(f"no .{extension} files at {path!r}")
    return files


def _default_image_column(ds: Any, kind: str) -> str:
    names = ds.column_names
    if "image" in names:
        return "image"
    found = [n for n in names if f".{n.lower()}" in IMAGE_SUFFIXES] if kind == "webdataset" else []
    if found:
        return found[0]
    raise ValueError(f"cannot tell which column holds the image (columns: {', '.join(names)}); set data.image_column")


def _caption_columns(ds: Any, configured: list[str] | None) -> list[str]:
    if configured is not None:
        return list(configured)
    return [c for c in AUTO_CAPTION_COLUMNS if c in ds.column_names][:1]


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if isinstance(value, str) and part:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return None
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return [text.strip()] if text.strip() else []


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------------------------------------ batches
@dataclasses.dataclass
class ImageBatch:
    """Collated samples; rejected inputs are not in the tensors but listed in `rejects`."""

    pixels: Tensor                # (B, 3, S, S) uint8 of the kept samples (B may be 0)
    ids: list[str]                # B stable sample ids
    captions: list[list[str]]     # B caption lists
    meta: list[str | None]        # B JSON strings or None
    indices: list[int]            # B source indices
    rejects: list[Reject]         # the dropped inputs of this batch, with reasons

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        """Move the pixels (used by ``accelerate``'s device placement)."""
        return dataclasses.replace(self, pixels=self.pixels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ImageBatch:
        """Pinned pixels (called by the DataLoader when `pin_memory` is on)."""
        return dataclasses.replace(self, pixels=self.pixels.pin_memory())

    def to_images(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, 3, S, S) float in [0, 1] on `device` (uint8 crosses to the device, then converts)."""
        pixels = self.pixels if device is None else self.pixels.to(device, non_blocking=True)
        return pixels.to(dtype) / 255


def collate_samples(samples: Sequence[Sample], image_size: int = 0) -> ImageBatch:
    """Stack the accepted samples and list the rejected ones (never raises on a bad input).

    `image_size` only shapes the empty (0, 3, S, S) tensor of a batch whose inputs were all rejected."""
    kept = [s for s in samples if s.reject is None]
    rejects = [Reject(s.index, s.id, s.reject) for s in samples if s.reject is not None]
    if kept:
        pixels = torch.stack([s.pixels for s in kept])
    else:
        pixels = torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    return ImageBatch(pixels, [s.id for s in kept], [s.captions for s in kept], [s.meta for s in kept],
                      [s.index for s in kept], rejects)


def make_loader(source: ImageSource, batch_size: int = 32, num_workers: int = 0, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False, batch_sampler: Sequence[Sequence[int]] | None = None,
                prefetch_factor: int | None = None) -> DataLoader:
    """A DataLoader of `ImageBatch`es: decoding and transforms run in `num_workers` worker processes.

    `batch_sampler` (lists of indices) overrides batch_size / shuffle / drop_last; shuffling is seeded."""
    collate = functools.partial(collate_samples, image_size=source.image_size)
    common: dict[str, Any] = {"num_workers": num_workers, "collate_fn": collate,
                              "pin_memory": torch.cuda.is_available(),
                              "prefetch_factor": prefetch_factor if num_workers else None}
    if batch_sampler is not None:
        return DataLoader(source, batch_sampler=batch_sampler, **common)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(source, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator,
                      **common)


class RejectCounter:
    """Running totals of rejected inputs by kind (the part of the reason before the colon)."""

    def __init__(self) -> None:
        self.by_kind: dict[str, int] = {}
        self.examples: list[Reject] = []

    def add(self, rejects: Sequence[Reject], keep_examples: int = 100) -> None:
        for r in rejects:
            kind = r.reason.split(":", 1)[0]
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            if len(self.examples) < keep_examples:
                self.examples.append(r)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())
