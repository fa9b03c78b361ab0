"""The shapes world's vocabulary and its prompt specs, in GenEval's metadata schema.

A spec is a plain dict, exactly GenEval's schema::

    {"tag": "position",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "exclude": [{"class": "circle", "count": 2}, {"class": "square", "count": 2},
                 {"class": "triangle", "count": 1}, {"class": "diamond", "count": 1}],
     "prompt": "a photo of a circle left of a square"}

`include` clauses are ANDed, `exclude` clauses ORed (see `selftok.shapes.evaluator`). Shapes-world specs are
*exact*: a scene rendered from a spec holds exactly the objects it names, and the spec says so with exclude
clauses (one more than the named count of each named class, one of every unnamed class). Specs read from a
GenEval file are used as they are.

Coordinates: boxes are ``(x0, y0, x1, y1)`` with y pointing down, in any unit shared by both boxes.
"""
from __future__ import annotations

import json
import math
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
"""Object classes. Every shape is drawn in a square box; the triangle points up, the diamond is a square
rotated by 45 degrees."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "orange": (250, 145, 15),
    "yellow": (250, 230, 30),
    "green": (20, 130, 40),
    "blue": (25, 105, 235),
    "purple": (145, 35, 175),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
"""Object colours (GenEval colour names) and their sRGB values: pairwise CIELAB distance >= 43, and every
colour differs from the background in luma by >= 32/255 (JPEG keeps luma at full resolution)."""

BACKGROUND: tuple[int, int, int] = (128, 128, 128)
"""The plain background (mid grey: not a GenEval colour, far from every object colour)."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MIRROR: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six categories, in GenEval's order."""

MAX_COUNT = 4
POSITION_THRESHOLD = 0.1
"""GenEval shrinks the centre offset by this fraction of the summed box sizes, per axis."""


class SpecError(ValueError):
    """A spec that is malformed or that the shapes world cannot judge (e.g. a GenEval class like "dog")."""


def clause(shape: str, count: int = 1, color: str | None = None,
           position: tuple[str, int] | None = None) -> dict[str, Any]:
    """One include clause in GenEval's key order."""
    out: dict[str, Any] = {"class": shape, "count": count}
    if color is not None:
        out["color"] = color
    if position is not None:
        out["position"] = [position[0], position[1]]
    return out


def exact_excludes(include: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exclude clauses that make `include` exact: no more of each named class, none of the others."""
    named: dict[str, int] = {}
    for c in include:
        named[c["class"]] = named.get(c["class"], 0) + c["count"]
    return [{"class": s, "count": named.get(s, 0) + 1} for s in SHAPES]


def make_spec(tag: str, include: list[dict[str, Any]], prompt: str) -> dict[str, Any]:
    """An exact shapes-world spec (include clauses plus `exact_excludes`)."""
    return {"tag": tag, "include": include, "exclude": exact_excludes(include), "prompt": prompt}


def validate_spec(spec: Any, shapes_only: bool = True) -> dict[str, Any]:
    """Check `spec` against GenEval's schema and return it; raise `SpecError` naming the problem.

    Top-level keys other than GenEval's (e.g. an ``id`` or ``seed`` next to the spec) are allowed and
    ignored; unknown keys inside a clause are errors. With `shapes_only`, classes must be shapes-world
    shapes and colours shapes-world colours, which is what the program evaluator needs (a GenEval class
    such as "dog" cannot be judged without a detector).
    """
    where = f"spec {spec.get('prompt')!r}" if isinstance(spec, dict) and "prompt" in spec else "spec"
    if not isinstance(spec, dict):
        raise SpecError(f"a spec must be a JSON object, got {type(spec).__name__}")
    include = spec.get("include")
    if not isinstance(include, list) or not include:
        raise SpecError(f"{where}: 'include' must be a non-empty list of clauses")
    if not isinstance(spec.get("exclude", []), list):
        raise SpecError(f"{where}: 'exclude' must be a list of clauses")
    for i, c in enumerate(include):
        _check_clause(c, f"{where}: include[{i}]", shapes_only, n_before=i, allow_extra=True)
    for i, c in enumerate(spec.get("exclude", [])):
        _check_clause(c, f"{where}: exclude[{i}]", shapes_only, n_before=0, allow_extra=False)
    return spec


def _check_clause(c: Any, where: str, shapes_only: bool, n_before: int, allow_extra: bool) -> None:
    if not isinstance(c, dict) or not isinstance(c.get("class"), str):
        raise SpecError(f"{where}: a clause must be an object with a 'class' string")
    valid = {"class", "count", "color", "position"} if allow_extra else {"class", "count"}
    extra = sorted(set(c) - valid)
    if extra:
        raise SpecError(f"{where}: unknown key {extra[0]!r}; valid keys: {', '.join(sorted(valid))}")
    count = c.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SpecError(f"{where}: 'count' must be a positive integer, got {count!r}")
    if shapes_only and c["class"] not in SHAPES:
        raise SpecError(f"{where}: class {c['class']!r} is not a shapes-world shape ({', '.join(SHAPES)}); "
                        "the program evaluator can only judge shapes")
    if "color" in c and shapes_only and c["color"] not in COLORS:
        raise SpecError(f"{where}: colour {c['color']!r} is not a shapes-world colour ({', '.join(COLORS)})")
    if "position" in c:
        pos = c["position"]
        if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                or isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < n_before):
            raise SpecError(f"{where}: 'position' must be [relation, index of an earlier include clause] "
                            f"with relation in {list(RELATIONS)}, got {pos!r}")


def spec_signature(spec: dict[str, Any]) -> str:
    """A canonical string for what a spec asserts, equal for equivalent phrasings.

    Ignores the prompt, the tag and the order of clauses; "A left of B" equals "B right of A".
    """
    include = spec["include"]
    objects = sorted(json.dumps([c["class"], c.get("count", 1), c.get("color")]) for c in include)
    relations = sorted(canonical_relation(
        (c["class"], c.get("color")), c["position"][0],
        (include[c["position"][1]]["class"], include[c["position"][1]].get("color")))
        for c in include if "position" in c)
    exclude = sorted(json.dumps([c["class"], c.get("count", 1)]) for c in spec.get("exclude", []))
    return json.dumps({"objects": objects, "relations": [list(map(str, r)) for r in relations],
                       "exclude": exclude}, sort_keys=True)


def canonical_relation(a: Any, relation: str, b: Any) -> tuple[Any, str, Any]:
    """``(a, relation, b)`` or its mirror ``(b, MIRROR[relation], a)``, whichever sorts first."""
    forward, mirrored = (a, relation, b), (b, MIRROR[relation], a)
    return min(forward, mirrored, key=lambda t: json.dumps(t))


def relative_offset(box_a: tuple[float, float, float, float],
                    box_b: tuple[float, float, float, float]) -> tuple[float, float]:
    """GenEval's normalised offset of A relative to B: ``(dx, dy)``, each in [-1, 1].

    offset = centre_a - centre_b, shrunk per axis by 0.1 * (size_a + size_b) toward 0 (not past it), divided
    by |offset|. Returns (0, 0) when the shrunk offset vanishes (boxes essentially concentric).
    """
    ox = (box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2
    oy = (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2
    shrink_x = POSITION_THRESHOLD * ((box_a[2] - box_a[0]) + (box_b[2] - box_b[0]))
    shrink_y = POSITION_THRESHOLD * ((box_a[3] - box_a[1]) + (box_b[3] - box_b[1]))
    rx = math.copysign(max(abs(ox) - shrink_x, 0.0), ox)
    ry = math.copysign(max(abs(oy) - shrink_y, 0.0), oy)
    norm = math.hypot(ox, oy)
    if norm == 0 or (abs(rx) < 1e-3 * norm and abs(ry) < 1e-3 * norm):
        return 0.0, 0.0
    return rx / norm, ry / norm


def relations_of(box_a: tuple[float, float, float, float],
                 box_b: tuple[float, float, float, float]) -> set[str]:
    """GenEval's relations holding for A relative to B (0.5 threshold on the normalised offset)."""
    dx, dy = relative_offset(box_a, box_b)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels
