"""Scenes: drawn from specs, exactly the spec's objects, non-overlapping, deterministic, any size >= 32."""
from __future__ import annotations

import random

import numpy as np
import pytest

from selftok.shapes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    Scene,
    ShapeObject,
    SpecError,
    judge,
    parse_prompt,
    render_scene,
    render_spec,
    sample_scene,
    scene_spec,
    split_specs,
)
from selftok.shapes.evaluator import scene_objects
from selftok.shapes.scene import GAP, MARGIN, RELATION_MARGIN, _relation_margin
from selftok.shapes.spec import relations_of


def _specs():
    return [s for t in CATEGORIES for split in ("train", "heldout") for s in split_specs(split, t)[:12]]


def test_scene_holds_exactly_the_spec_objects():
    rng = random.Random(0)
    for spec in _specs():
        scene = sample_scene(spec, rng)
        assert judge(scene_objects(scene), spec)[0], spec["prompt"]
        assert len(scene.objects) == sum(c["count"] for c in spec["include"])


def test_objects_are_inside_and_apart():
    rng = random.Random(1)
    for spec in _specs():
        objs = sample_scene(spec, rng).objects
        for o in objs:
            assert MARGIN - 1e-9 <= o.box[0] and o.box[2] <= 1 - MARGIN + 1e-9
            assert MARGIN - 1e-9 <= o.box[1] and o.box[3] <= 1 - MARGIN + 1e-9
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                gap = max(abs(a.cx - b.cx) - (a.size + b.size) / 2, abs(a.cy - b.cy) - (a.size + b.size) / 2)
                assert gap >= GAP - 1e-9


def test_position_scenes_hold_only_the_asked_relation_with_margin():
    rng = random.Random(2)
    for spec in split_specs("train", "position") + split_specs("heldout", "position"):
        ref, sub = _by_clause(spec, rng)
        rel = spec["include"][1]["position"][0]
        assert relations_of(sub.box, ref.box) == {rel}
        assert _relation_margin(sub.box, ref.box, rel, exclusive=True) >= RELATION_MARGIN


def _by_clause(spec, rng):
    scene = sample_scene(spec, rng)
    ref = next(o for o in scene.objects if o.shape == spec["include"][0]["class"])
    sub = next(o for o in scene.objects if o.shape == spec["include"][1]["class"])
    return ref, sub


def test_rendering_is_deterministic_and_any_size():
    spec = parse_prompt("a photo of a red circle left of a blue square")
    s1, im1 = render_spec(spec, seed=7)
    s2, im2 = render_spec(spec, seed=7)
    assert s1 == s2 and np.array_equal(np.asarray(im1), np.asarray(im2))
    assert render_spec(spec, seed=8)[0] != s1
    for size in (32, 48, 100, 256):
        im = render_scene(s1, size)
        assert im.size == (size, size) and im.mode == "RGB"
    with pytest.raises(ValueError, match=">= 32"):
        render_scene(s1, 16)


def test_rendering_is_antialiased_and_flat():
    scene = Scene((ShapeObject("circle", "red", 0.5, 0.5, 0.375),))
    a = np.asarray(render_scene(scene, 64)).reshape(-1, 3)
    colours = {tuple(c) for c in a}
    assert BACKGROUND in colours and COLORS["red"] in colours
    edge = [c for c in colours if c not in (BACKGROUND, COLORS["red"])]
    assert 5 < len(edge) < 200   # blended edge pixels, but a flat interior and background
    # the rendered area matches the disc: pi/4 * 24^2 px
    t = (a[:, 0].astype(float) - 128) / (215 - 128)
    assert abs(t.sum() - np.pi / 4 * 24 ** 2) < 8


def test_scene_spec_describes_everything():
    scene = Scene((ShapeObject("circle", "red", 0.2, 0.2, 0.25),
                   ShapeObject("circle", "red", 0.2, 0.75, 0.25),
                   ShapeObject("square", "blue", 0.75, 0.5, 0.3)))
    full = scene_spec(scene)
    assert full["tag"] == "scene" and full["prompt"] == "a photo of two red circles and a blue square"
    assert full["include"] == [{"class": "circle", "count": 2, "color": "red"},
                               {"class": "square", "count": 1, "color": "blue", "position": ["right of", 0]}]
    assert {c["class"]: c["count"] for c in full["exclude"]} == {"circle": 3, "square": 2, "triangle": 1,
                                                                 "diamond": 1}
    assert judge(scene_objects(scene), full)[0]
    moved = Scene(scene.objects[:2] + (ShapeObject("square", "blue", 0.2, 0.5, 0.1),))
    assert not judge(scene_objects(moved), full)[0]
    assert "position" not in scene_spec(scene, positions=False)["include"][1]


def test_scene_json_round_trip_and_bad_specs():
    scene, _ = render_spec(parse_prompt("three squares"), seed=3)
    assert Scene.from_json(scene.to_json()) == scene
    with pytest.raises(SpecError, match="at most 4"):
        sample_scene({"include": [{"class": "circle", "count": 5}]}, random.Random(0))
    with pytest.raises(SpecError, match="'dog' is not a shapes-world shape"):
        sample_scene({"include": [{"class": "dog", "count": 1}]}, random.Random(0))
