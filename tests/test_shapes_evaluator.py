"""The program evaluator: GenEval's rules on known detections, accuracy on clean and perturbed scenes,
sensitivity to edits, and bad input."""
from __future__ import annotations

import dataclasses
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selftok.shapes import (
    COLORS,
    SHAPES,
    Detection,
    ImageError,
    Scene,
    SpecError,
    aggregate,
    category_standard_errors,
    detect_objects,
    evaluate_image,
    judge,
    make_example,
    overall_standard_error,
    paired_change,
    parse_prompt,
    render_scene,
    render_spec,
    scene_spec,
)
from selftok.shapes.evaluator import Judgement, classify_color, failed_judgement, to_rgb_array
from selftok.shapes.spec import relations_of, relative_offset

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_evaluator.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_evaluator", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def det(shape, color="red", box=(0.1, 0.1, 0.3, 0.3), score=0.9):
    return Detection(shape, color, box, score, COLORS.get(color, (0, 0, 0)), 0.04)


# ---------------------------------------------------------------------------------------------- rules
def test_geneval_position_rule():
    # offset -12, shrink 0.1 * (10 + 10) = 2 -> -10 / 12 = -0.83: left of only
    assert relations_of((0, 0, 10, 10), (12, 0, 22, 10)) == {"left of"}
    assert relative_offset((0, 0, 10, 10), (12, 0, 22, 10)) == pytest.approx((-10 / 12, 0.0))
    # offset (-10, -10), shrink 2 per axis -> (-8, -8) / 14.14 = -0.57 each: left of and above
    assert relations_of((0, 0, 10, 10), (10, 10, 20, 20)) == {"left of", "above"}
    # offset 3 < shrink 4 on a big pair of boxes: no relation
    assert relations_of((0, 0, 20, 20), (3, 0, 23, 20)) == set()
    # offset (4, 12): x shrinks to 0; y 10 / 12.6 = 0.79 -> below only
    assert relations_of((4, 12, 14, 22), (0, 0, 10, 10)) == {"below"}


def test_geneval_counting_colour_and_exclude_rules():
    spec = parse_prompt("a photo of three circles")
    three = [det("circle", box=(0.1 * i, 0, 0.1 * i + 0.05, 0.05)) for i in range(3)]
    assert judge(three, spec)[0]
    assert not judge(three[:2], spec)[0]                       # at least 3
    assert not judge(three + [det("circle")], spec)[0]         # exclude: fewer than 4
    assert not judge(three + [det("square")], spec)[0]         # exact spec: no other shape
    assert judge(three + [det("unknown")], spec)[0]            # unrecognised blobs count as nothing
    loose = {"include": [{"class": "circle", "count": 3}]}     # a GenEval-style spec: other shapes allowed
    assert judge(three + [det("square")], loose)[0]
    red = {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    # a clause naming a colour takes objects of that colour first (GenEval would take the top-scoring one)
    assert judge([det("circle", "blue", score=0.99), det("circle", "red", score=0.5)], red)[0]
    assert not judge([det("circle", "blue")], red)[0]


def test_position_claims_follow_the_matched_groups():
    spec = parse_prompt("a photo of a circle left of a square")
    left, right = (0.1, 0.4, 0.3, 0.6), (0.6, 0.4, 0.8, 0.6)
    ok, claims = judge([det("circle", box=left), det("square", box=right)], spec)
    assert ok and [c.kind for c in claims][:3] == ["count", "count", "position"]
    ok, claims = judge([det("circle", box=right), det("square", box=left)], spec)
    assert not ok and [c.kind for c in claims if not c.passed] == ["position"]
    ok, claims = judge([det("circle", box=left)], spec)       # no target: position unchecked
    pos = next(c for c in claims if c.kind == "position")
    assert not ok and not pos.passed and "no target" in pos.detail


def test_aggregate_is_the_mean_over_categories():
    def verdict(tag, correct):
        return Judgement(tag, "", correct, (), ())
    js = [verdict("counting", True)] * 3 + [verdict("counting", False)] + [verdict("colors", False)] * 2
    js.append(failed_judgement({"tag": "colors"}, "broken file"))
    s = aggregate(js)
    assert s.per_category == {"counting": 0.75, "colors": 0.0}
    assert s.overall == pytest.approx(0.375) and s.n == 7 and s.n_errors == 1
    assert s.counts == {"counting": 4, "colors": 3}


def test_standard_error_treats_prompts_as_the_sampled_units():
    # category a: prompts p (2 seeds, both right) and q (both wrong) -> prompt means 1, 0: variance 0.5 over 2
    # prompts; category b: prompts r, s both half right -> variance 0. overall s.e. = sqrt(0.25 + 0) / 2
    rows = [("a", "p", 1), ("a", "p", 1), ("a", "q", 0), ("a", "q", 0),
            ("b", "r", 1), ("b", "r", 0), ("b", "s", 0), ("b", "s", 1)]
    assert overall_standard_error(rows) == pytest.approx(0.25)
    assert category_standard_errors(rows) == {"a": pytest.approx(0.5), "b": 0.0}
    assert category_standard_errors([("a", "p", 1), ("b", "q", 1), ("b", "r", 0)]) == {"a": None,
                                                                                       "b": pytest.approx(0.5)}
    # the same four outcomes as independent images of four prompts would give a smaller error
    assert overall_standard_error([("a", str(i), v) for i, v in enumerate((1, 1, 0, 0))]) == pytest.approx(
        (1 / 3 / 4) ** 0.5)
    assert overall_standard_error([("a", "p", 1), ("a", "p", 0)]) is None  # one prompt: no spread to measure


def test_paired_change_matches_images_by_file_name():
    def rec(name, tag, prompt, correct):
        return {"file_name": name, "tag": tag, "prompt": prompt, "correct": correct}
    before = [rec("0.png", "a", "p", False), rec("1.png", "a", "q", True), rec("2.png", "b", "r", False),
              rec("3.png", "b", "s", False)]
    after = [rec("3.png", "b", "s", True), rec("2.png", "b", "r", False), rec("1.png", "a", "q", True),
             rec("0.png", "a", "p", True)]
    change = paired_change(before, after)
    # a: +1, 0 -> mean 0.5; b: 0, +1 -> 0.5; per-prompt differences vary by 0.5 in each category
    assert change["change"] == pytest.approx(0.5) and change["n_images"] == 4
    assert change["standard_error"] == pytest.approx(((0.5 / 2) + (0.5 / 2)) ** 0.5 / 2)
    assert paired_change(before, before) == {"change": 0.0, "standard_error": 0.0, "n_images": 4}
    with pytest.raises(ValueError, match="same image files"):
        paired_change(before, after[:3])


def test_colour_classification_tolerates_shifts():
    for name, rgb in COLORS.items():
        c = np.asarray(rgb) / 255.0
        assert classify_color(c) == name
        assert classify_color(np.clip(c * 0.9 + 0.05, 0, 1)) == name


# ---------------------------------------------------------------------------------------------- accuracy
def test_small_benchmark_meets_the_bars():
    res = _bench().run(n=60, seed=1)
    assert res["clean"] >= 0.99 and res["clean_scene_spec"] >= 0.99
    for k in ("jpeg50", "blur1", "noise05"):
        assert res[k] >= 0.95, (k, res["failures"])
    assert res["mismatch_false_pass"] <= 0.02 and res["mismatch_pass"] <= 0.12


def _edits(scene: Scene, rng: random.Random) -> list[Scene]:
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    o = objs[i]
    other_shape = rng.choice([s for s in SHAPES if s != o.shape])
    other_color = rng.choice([c for c in COLORS if c != o.color])
    return [Scene(tuple(objs[:i] + [dataclasses.replace(o, shape=other_shape)] + objs[i + 1:])),
            Scene(tuple(objs[:i] + [dataclasses.replace(o, color=other_color)] + objs[i + 1:])),
            Scene(tuple(objs[:i] + objs[i + 1:]))] if len(objs) > 1 else [
            Scene((dataclasses.replace(o, shape=other_shape),)),
            Scene((dataclasses.replace(o, color=other_color),))]


def test_full_scene_spec_catches_every_edit():
    rng = random.Random(0)
    caught = total = 0
    for i in range(40):
        ex = make_example("train", i, seed=5)
        full = scene_spec(ex.scene)
        assert evaluate_image(ex.image, full).correct
        for edited in _edits(ex.scene, rng):
            total += 1
            caught += not evaluate_image(render_scene(edited), full).correct
    assert caught == total


def test_any_image_size():
    spec = parse_prompt("a photo of a green triangle below a white diamond")
    scene, _ = render_spec(spec, seed=4)
    for size in (32, 40, 128, 300):
        assert evaluate_image(render_scene(scene, size), spec).correct, size
    big = render_scene(scene, 64).resize((96, 80), Image.BILINEAR)   # wrong size and aspect: still judged
    assert evaluate_image(big, spec).correct


# ---------------------------------------------------------------------------------------------- bad input
def test_image_modes_are_converted():
    spec = parse_prompt("a photo of a red square and a blue circle")
    _, im = render_spec(spec, seed=2)
    assert evaluate_image(im.convert("RGBA"), spec).correct
    assert evaluate_image(im.quantize(16), spec).correct                 # palette
    assert evaluate_image(np.asarray(im), spec).correct                   # uint8 array
    assert evaluate_image(np.asarray(im) / 255.0, spec).correct           # float array
    transparent = im.convert("RGBA")
    transparent.putalpha(0)                                               # fully transparent: background only
    assert detect_objects(transparent) == []
    grey = evaluate_image(im.convert("L"), parse_prompt("a photo of a square and a circle"))
    assert grey.correct                                                   # shapes survive, colours cannot
    sixteen = Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 256)
    assert sixteen.mode == "I;16"
    assert evaluate_image(sixteen, parse_prompt("a photo of a square and a circle")).correct


def test_unusable_input_raises_clear_errors(tmp_path):
    spec = parse_prompt("a photo of a circle")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        evaluate_image(bad, spec)
    with pytest.raises(ImageError, match="at least 16 px"):
        evaluate_image(Image.new("RGB", (10, 10)), spec)
    with pytest.raises(ImageError, match="NaN"):
        evaluate_image(np.full((64, 64, 3), np.nan, dtype=np.float32), spec)
    with pytest.raises(ImageError, match="shape"):
        to_rgb_array(np.zeros((64, 64, 5), dtype=np.uint8))
    with pytest.raises(SpecError, match="'dog' is not a shapes-world shape"):
        evaluate_image(Image.new("RGB", (64, 64)), {"tag": "x", "include": [{"class": "dog", "count": 1}]})


def test_blank_and_cluttered_images_fail():
    spec = parse_prompt("a photo of a circle")
    assert not evaluate_image(Image.new("RGB", (64, 64), (128, 128, 128)), spec).correct
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    assert not evaluate_image(noise, spec).correct
