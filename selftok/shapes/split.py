"""The fixed train / held-out split of shapes-world prompt specs.

A spec is held out when it contains a held-out *combination*: a pair of shapes shown together, a colour on
a shape, a count of a shape, or a shape-relation-shape triple. Every atom (each shape, colour, count 1-4
and relation) still occurs in training specs, so held-out specs test compositional generalisation; and since
training captions only phrase training specs, no held-out combination ever appears in a training caption.
single_object specs contain no combination, so they are all in training and the held-out evaluation list
reuses them (see docs/shapes.md).
"""
from __future__ import annotations

import functools
import itertools
import random
from typing import Any

from selftok.shapes.grammar import (
    color_attr_spec,
    colors_spec,
    counting_spec,
    position_spec,
    single_object_spec,
    two_object_spec,
)
from selftok.shapes.spec import CATEGORIES, COLORS, MAX_COUNT, RELATIONS, SHAPES, canonical_relation

SPLITS: tuple[str, ...] = ("train", "heldout")

HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("circle", "triangle"), ("diamond", "square"))
"""Shape pairs never shown together in training (the other four pairs form a cycle over all shapes)."""
HELDOUT_COLORS: tuple[tuple[str, str], ...] = (
    ("red", "square"), ("orange", "circle"), ("yellow", "triangle"), ("green", "diamond"),
    ("blue", "circle"), ("purple", "square"), ("black", "triangle"), ("white", "diamond"))
"""(colour, shape) combinations: every colour once, every shape twice."""
HELDOUT_COUNTS: tuple[tuple[str, int], ...] = (("circle", 3), ("square", 4), ("triangle", 2), ("diamond", 3))
HELDOUT_RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("circle", "above", "square"), ("square", "left of", "triangle"),
    ("triangle", "below", "diamond"), ("diamond", "right of", "circle"))
"""(subject, relation, reference) on training pairs; the mirrored phrasing is held out with it."""

HELDOUT_KEYS: frozenset[tuple[Any, ...]] = frozenset(
    [("pair",) + tuple(sorted(p)) for p in HELDOUT_PAIRS]
    + [("color", c, s) for c, s in HELDOUT_COLORS]
    + [("count", s, n) for s, n in HELDOUT_COUNTS]
    + [("relation",) + canonical_relation(a, r, b) for a, r, b in HELDOUT_RELATIONS])

EVAL_PER_CATEGORY = 16
"""Entries per category in the fixed held-out evaluation list (96 in all)."""


def combination_keys(spec: dict[str, Any]) -> set[tuple[Any, ...]]:
    """The combinations a spec asserts: ("pair", a, b), ("color", colour, shape), ("count", shape, n) for
    n >= 2, ("relation", a, rel, b) in canonical (mirror-invariant) form."""
    include = spec["include"]
    keys: set[tuple[Any, ...]] = set()
    classes = sorted({c["class"] for c in include})
    for a, b in itertools.combinations(classes, 2):
        keys.add(("pair", a, b))
    for c in include:
        if c.get("count", 1) >= 2:
            keys.add(("count", c["class"], c["count"]))
        if "color" in c:
            keys.add(("color", c["color"], c["class"]))
        if "position" in c:
            ref = include[c["position"][1]]["class"]
            keys.add(("relation",) + canonical_relation(c["class"], c["position"][0], ref))
    return keys


def heldout_kinds(spec: dict[str, Any]) -> tuple[str, ...]:
    """The kinds of held-out combination a spec contains ("color", "count", "pair", "relation"), sorted."""
    return tuple(sorted({key[0] for key in combination_keys(spec) & HELDOUT_KEYS}))


def split_of(spec: dict[str, Any]) -> str:
    """"heldout" if the spec contains a held-out combination, else "train"."""
    return "heldout" if heldout_kinds(spec) else "train"


@functools.cache
def _all_specs(tag: str) -> tuple[dict[str, Any], ...]:
    pairs = list(itertools.permutations(SHAPES, 2))
    if tag == "single_object":
        out = [single_object_spec(s) for s in SHAPES]
    elif tag == "counting":
        out = [counting_spec(s, n) for s in SHAPES for n in range(1, MAX_COUNT + 1)]
    elif tag == "colors":
        out = [colors_spec(s, c) for s in SHAPES for c in COLORS]
    elif tag == "two_object":
        out = [two_object_spec(a, b) for a, b in pairs]
    elif tag == "position":
        out = [position_spec(a, r, b) for a, b in pairs for r in RELATIONS]
    elif tag == "color_attr":
        out = [color_attr_spec(a, ca, b, cb)
               for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)]
    else:
        raise ValueError(f"unknown category {tag!r}; categories: {', '.join(CATEGORIES)}")
    return tuple(out)


def all_specs(tag: str) -> list[dict[str, Any]]:
    """Every canonical spec of a category, in a fixed order."""
    return [copy_spec(s) for s in _all_specs(tag)]


def copy_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a spec (the cached specs must not be changed through a caller's copy)."""
    include = [{k: list(v) if k == "position" else v for k, v in c.items()} for c in spec["include"]]
    return {**spec, "include": include,
            "exclude": [dict(c) for c in spec.get("exclude", [])]}


@functools.cache
def _split_specs(split: str, tag: str) -> tuple[dict[str, Any], ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    specs = _all_specs(tag)
    if tag == "single_object":  # nothing to hold out: both splits use all of them
        return specs
    return tuple(s for s in specs if split_of(s) == split)


def split_specs(split: str, tag: str) -> list[dict[str, Any]]:
    """The specs of one category in a split (single_object: all four in both splits)."""
    return [copy_spec(s) for s in _split_specs(split, tag)]


def choose_spec(split: str, tag: str, rng: random.Random) -> dict[str, Any]:
    """One spec of a category in a split, drawn uniformly with `rng`."""
    return copy_spec(rng.choice(_split_specs(split, tag)))


@functools.cache
def _heldout_eval() -> tuple[tuple[dict[str, Any], int], ...]:
    entries: list[tuple[dict[str, Any], int]] = []
    held_pairs = {("pair",) + tuple(sorted(p)) for p in HELDOUT_PAIRS}
    for ci, tag in enumerate(CATEGORIES):
        specs = list(_split_specs("heldout", tag))
        on_pair = [s for s in specs if combination_keys(s) & held_pairs]
        other = [s for s in specs if not combination_keys(s) & held_pairs]
        if tag == "position":
            # all relation hold-outs (both phrasings) + one phrasing per held-out pair and relation
            specs = other + [s for s in on_pair if s["include"][1]["class"] < s["include"][0]["class"]]
        elif tag == "color_attr":
            # half on held-out pairs, half on training pairs with a held-out colour on a shape
            half = EVAL_PER_CATEGORY // 2
            specs = _spread(on_pair, half) + _spread(other, EVAL_PER_CATEGORY - half)
        specs = _spread(specs, min(len(specs), EVAL_PER_CATEGORY))
        for j in range(EVAL_PER_CATEGORY):
            entries.append((specs[j % len(specs)], 1000 * (ci + 1) + j))
    return tuple(entries)


def _spread(items: list[Any], n: int) -> list[Any]:
    """`n` items evenly spaced through `items` (deterministic, no RNG)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def heldout_prompts() -> list[dict[str, Any]]:
    """The fixed held-out evaluation list: 16 entries per category (96), each a spec plus ``id`` and
    ``seed`` keys (render it with ``render_spec(entry, entry["seed"])``). Categories with fewer held-out
    specs repeat them with different seeds."""
    return [{**copy_spec(spec), "id": f"heldout-{spec['tag']}-{i % EVAL_PER_CATEGORY:02d}", "seed": seed}
            for i, (spec, seed) in enumerate(_heldout_eval())]
