"""Shapes-world examples as a Python iterable and as a `datasets.Dataset`.

Example `index` of (`split`, `seed`) is a pure function of those three values (its own RNG), so any slice
can be generated independently - by several data-loader workers or ranks - and always comes out the same.
Categories rotate with the index (index % 6 in `CATEGORIES` order), so every prefix is balanced.
"""
from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from selftok.shapes.grammar import sample_caption
from selftok.shapes.scene import Scene, render_scene, sample_scene, scene_spec
from selftok.shapes.spec import CATEGORIES
from selftok.shapes.split import SPLITS, choose_spec


@dataclasses.dataclass(frozen=True)
class Example:
    """One sample: a spec of the split, a training caption phrasing it, the scene drawn from the spec and
    its image. `spec["prompt"]` is the canonical prompt."""
    id: str
    split: str
    index: int
    tag: str
    spec: dict[str, Any]
    caption: str
    scene: Scene
    image: Image.Image

    @property
    def prompt(self) -> str:
        return self.spec["prompt"]

    def row(self) -> dict[str, Any]:
        """The dataset row: image (PIL), caption, prompt, tag, id, split and JSON strings for spec, scene
        (object list) and scene_spec (the full-scene spec, for attribute-preservation checks)."""
        return {"image": self.image, "caption": self.caption, "prompt": self.prompt, "tag": self.tag,
                "id": self.id, "split": self.split, "spec": json.dumps(self.spec),
                "scene": self.scene.to_json(), "scene_spec": json.dumps(scene_spec(self.scene))}


def make_example(split: str, index: int, seed: int = 0, size: int = 64,
                 tags: Sequence[str] | None = None) -> Example:
    """Example `index` of the stream (`split`, `seed`): deterministic, independent of other indices."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    tags = tuple(tags) if tags else CATEGORIES
    unknown = [t for t in tags if t not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown category {unknown[0]!r}; categories: {', '.join(CATEGORIES)}")
    rng = random.Random(f"selftok.shapes:{split}:{seed}:{index}")
    tag = tags[index % len(tags)]
    spec = choose_spec(split, tag, rng)
    caption = sample_caption(spec, rng)
    scene = sample_scene(spec, rng)
    return Example(id=f"{split}-{seed}-{index:07d}", split=split, index=index, tag=tag, spec=spec,
                   caption=caption, scene=scene, image=render_scene(scene, size))


def iter_examples(split: str, seed: int = 0, n: int | None = None, size: int = 64, start: int = 0,
                  step: int = 1, tags: Sequence[str] | None = None) -> Iterator[Example]:
    """Examples `start`, `start + step`, ... of the stream (`split`, `seed`); endless when `n` is None.
    Use `start=rank, step=world_size` to shard across processes."""
    if step < 1 or start < 0 or (n is not None and n < 0):
        raise ValueError(f"need start >= 0, step >= 1, n >= 0; got {start}, {step}, {n}")
    index, produced = start, 0
    while n is None or produced < n:
        yield make_example(split, index, seed, size, tags)
        index += step
        produced += 1


def build_dataset(split: str, n: int, seed: int = 0, size: int = 64, tags: Sequence[str] | None = None):
    """The first `n` examples of (`split`, `seed`) as a `datasets.Dataset` with columns image, caption,
    prompt, tag, id, split, spec, scene, scene_spec (see `Example.row`)."""
    import datasets

    rows = [e.row() for e in iter_examples(split, seed, n, size, tags=tags)]
    text = ("caption", "prompt", "tag", "id", "split", "spec", "scene", "scene_spec")
    features = datasets.Features({"image": datasets.Image(), **{k: datasets.Value("string") for k in text}})
    columns = {k: [r[k] for r in rows] for k in features}
    return datasets.Dataset.from_dict(columns, features=features)
