"""Scenes of the shapes world: sampling a scene from a spec, rendering it with Pillow, and the full-scene
spec of a scene.

Geometry is resolution-free: object centres and sizes are fractions of the image side (x right, y down),
so one scene renders at any size >= 32 px. Every shape sits in a square box of side `size`; boxes of
different objects are at least `GAP` apart, so objects never touch.
"""
from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

from PIL import Image, ImageDraw

from selftok.shapes.grammar import noun_phrase
from selftok.shapes.spec import (
    BACKGROUND,
    COLORS,
    MIRROR,
    SHAPES,
    SpecError,
    clause,
    exact_excludes,
    relative_offset,
    validate_spec,
)

SIZES: tuple[float, ...] = (0.25, 0.3125, 0.375)
"""Object box sides as fractions of the image side (16, 20, 24 px at 64 px)."""
MARGIN = 0.03
"""Minimum distance between an object box and the image border."""
GAP = 0.08
"""Minimum gap between the boxes of two objects (5 px at 64 px)."""
RELATION_MARGIN = 0.15
"""Position scenes put the asked relation at least this far past GenEval's 0.5 threshold and keep the
other axis this far below it, so the relation survives blur, compression and small shifts."""
MIN_IMAGE_SIZE = 32

_MAX_TRIES = 400


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object: `shape` in SHAPES, `color` in COLORS, centre (`cx`, `cy`) and box side `size`, all as
    fractions of the image side."""
    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A list of non-overlapping objects on the plain `BACKGROUND`."""
    objects: tuple[ShapeObject, ...]

    def to_json(self) -> str:
        return json.dumps([dataclasses.asdict(o) for o in self.objects])

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls(tuple(ShapeObject(**o) for o in json.loads(text)))


# ---------------------------------------------------------------------------------------------- sampling
def sample_scene(spec: dict[str, Any], rng: random.Random) -> Scene:
    """A scene holding exactly the objects `spec` describes; attributes it leaves open (colour, size,
    place) are drawn with `rng`. Position clauses hold with `RELATION_MARGIN` to spare."""
    validate_spec(spec, shapes_only=True)
    kinds = []  # (shape, colour, clause index)
    for i, c in enumerate(spec["include"]):
        for _ in range(c.get("count", 1)):
            kinds.append((c["class"], c.get("color") or rng.choice(list(COLORS)), i))
    if len(kinds) > 4:
        raise SpecError(f"spec {spec.get('prompt')!r} asks for {len(kinds)} objects; scenes hold at most 4")
    for attempt in range(_MAX_TRIES):
        sizes = [rng.choice(SIZES) if attempt < _MAX_TRIES // 2 else SIZES[0] for _ in kinds]
        placed = _place(sizes, rng)
        if placed is None:
            continue
        objects = [ShapeObject(s, col, x, y, size) for (s, col, _), (x, y), size in zip(kinds, placed, sizes)]
        if _relations_hold(spec, [k[2] for k in kinds], objects):
            return Scene(tuple(objects))
    raise SpecError(f"could not lay out spec {spec.get('prompt')!r} in {_MAX_TRIES} tries")


def _place(sizes: list[float], rng: random.Random) -> list[tuple[float, float]] | None:
    """Centres for boxes of the given sides, inside the margins and `GAP` apart; None if this draw failed."""
    centres: list[tuple[float, float]] = []
    for size in sizes:
        lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
        for _ in range(30):
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if all(abs(x - px) >= (size + ps) / 2 + GAP or abs(y - py) >= (size + ps) / 2 + GAP
                   for (px, py), ps in zip(centres, sizes)):
                centres.append((x, y))
                break
        else:
            return None
    return centres


def _relations_hold(spec: dict[str, Any], owner: list[int], objects: list[ShapeObject]) -> bool:
    for i, c in enumerate(spec["include"]):
        if "position" not in c:
            continue
        rel, j = c["position"]
        for a in (o for o, k in zip(objects, owner) if k == i):
            for b in (o for o, k in zip(objects, owner) if k == j):
                if _relation_margin(a.box, b.box, rel, exclusive=True) < RELATION_MARGIN:
                    return False
    return True


def _relation_margin(box_a: tuple[float, ...], box_b: tuple[float, ...], relation: str,
                     exclusive: bool) -> float:
    """How far past GenEval's 0.5 threshold `relation` holds for A relative to B (negative: it does not).
    With `exclusive`, also how far the other axis stays below the threshold (the smaller of the two)."""
    dx, dy = relative_offset(box_a, box_b)  # type: ignore[arg-type]
    along, across = {"left of": (-dx, dy), "right of": (dx, dy),
                     "above": (-dy, dx), "below": (dy, dx)}[relation]
    margin = along - 0.5
    return min(margin, 0.5 - abs(across)) if exclusive else margin


# ---------------------------------------------------------------------------------------------- rendering
def render_scene(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB image, anti-aliased by drawing at `supersample` times the
    size and box-filtering down."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be >= {MIN_IMAGE_SIZE} px, got {size}")
    side = size * supersample
    img = Image.new("RGB", (side, side), BACKGROUND)
    _draw_objects(ImageDraw.Draw(img), scene.objects, side, lambda o: COLORS[o.color])
    return img.reduce(supersample) if supersample > 1 else img


def shape_map(scene: Scene, size: int) -> Image.Image:
    """A `size` x `size` label image ("L" mode, no anti-aliasing): 0 = background, 1 + SHAPES.index(shape)
    inside each object. The targets of the shape net that training losses use (`selftok.training.shape_net`)."""
    img = Image.new("L", (size, size), 0)
    _draw_objects(ImageDraw.Draw(img), scene.objects, size, lambda o: 1 + SHAPES.index(o.shape))
    return img


def _draw_objects(draw: ImageDraw.ImageDraw, objects: tuple[ShapeObject, ...], side: int, fill_of) -> None:
    for o in objects:
        x0, y0, x1, y1 = (v * side for v in o.box)
        cx, cy = o.cx * side, o.cy * side
        fill = fill_of(o)
        if o.shape == "circle":  # Pillow's ellipse and rectangle include their far edge: stop a pixel short
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon(((cx, y0), (x1, y1), (x0, y1)), fill=fill)
        elif o.shape == "diamond":
            draw.polygon(((cx, y0), (x1, cy), (cx, y1), (x0, cy)), fill=fill)
        else:
            raise SpecError(f"unknown shape {o.shape!r}; known shapes: {', '.join(SHAPES)}")


def render_spec(spec: dict[str, Any], seed: int, size: int = 64) -> tuple[Scene, Image.Image]:
    """Sample a scene for `spec` with `random.Random(seed)` and render it."""
    scene = sample_scene(spec, random.Random(seed))
    return scene, render_scene(scene, size)


# ---------------------------------------------------------------------------------------------- full spec
def scene_spec(scene: Scene, positions: bool = True) -> dict[str, Any]:
    """The exact spec of everything in `scene` (tag "scene"): one include clause per (shape, colour) group
    with its count, exact exclude clauses, and - with `positions` - for each group after the first, its
    relation to an earlier group when that relation holds for every pair of their objects with
    `RELATION_MARGIN` to spare (the most robust one is kept; a clause holds at most one position)."""
    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    order = sorted(scene.objects, key=lambda o: (SHAPES.index(o.shape), list(COLORS).index(o.color)))
    for o in order:
        groups.setdefault((o.shape, o.color), []).append(o)
    keys = list(groups)
    include = []
    for i, key in enumerate(keys):
        best: tuple[float, str, int] | None = None
        for j in range(i if positions else 0):
            for rel in MIRROR:
                m = min(_relation_margin(a.box, b.box, rel, exclusive=False)
                        for a in groups[key] for b in groups[keys[j]])
                if m >= RELATION_MARGIN and (best is None or m > best[0]):
                    best = (m, rel, j)
        include.append(clause(key[0], len(groups[key]), key[1], (best[1], best[2]) if best else None))
    parts = [noun_phrase(s, len(g), c) for (s, c), g in groups.items()]
    prompt = "a photo of " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
    return {"tag": "scene", "include": include, "exclude": exact_excludes(include), "prompt": prompt}

