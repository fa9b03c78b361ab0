"""Shapes-world prompts: canonical prompts, caption phrasings, the parser's errors, prompt files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selftok.shapes import (
    CATEGORIES,
    PromptParseError,
    SpecError,
    all_specs,
    caption_variants,
    load_prompts,
    parse_prompt,
    spec_signature,
    validate_spec,
    write_prompts,
)
from selftok.shapes.spec import SHAPES, canonical_relation

FIXTURE = Path(__file__).parent / "fixtures" / "geneval_metadata.jsonl"


def test_canonical_prompt_round_trips_exactly():
    for tag in CATEGORIES:
        for spec in all_specs(tag)[:: 7 if tag == "color_attr" else 1]:
            assert parse_prompt(spec["prompt"]) == spec


def test_every_caption_phrasing_parses_to_its_spec():
    for tag in CATEGORIES:
        for spec in all_specs(tag)[:: 11 if tag == "color_attr" else 1]:
            variants = caption_variants(spec)
            assert len(variants) >= 6 and len(set(variants)) == len(variants)
            for caption in variants:
                assert spec_signature(parse_prompt(caption)) == spec_signature(spec), caption


def test_specs_follow_geneval_schema():
    geneval = {json.loads(ln)["tag"]: json.loads(ln) for ln in FIXTURE.read_text().splitlines()}
    for tag in CATEGORIES:
        spec = all_specs(tag)[0]
        assert set(spec) == {"tag", "include", "exclude", "prompt"} and spec["tag"] == tag
        assert spec["prompt"].startswith("a photo of ")
        # same clause keys as GenEval's own spec of that category
        assert [set(c) for c in spec["include"]] == [set(c) for c in geneval[tag]["include"]]
        validate_spec(spec)


def test_exact_specs_exclude_everything_else():
    spec = parse_prompt("a photo of three circles")
    assert spec["include"] == [{"class": "circle", "count": 3}]
    assert {c["class"]: c["count"] for c in spec["exclude"]} == {s: 4 if s == "circle" else 1 for s in SHAPES}
    pos = parse_prompt("a photo of a circle left of a square")   # GenEval layout: reference first
    assert pos["include"] == [{"class": "square", "count": 1},
                              {"class": "circle", "count": 1, "position": ["left of", 0]}]


def test_mirrored_relation_is_the_same_spec():
    a = parse_prompt("a circle to the left of a square")
    b = parse_prompt("there is a square on the right of a circle")
    assert spec_signature(a) == spec_signature(b)
    assert spec_signature(a) != spec_signature(parse_prompt("a circle right of a square"))
    assert canonical_relation("x", "above", "y") == canonical_relation("y", "below", "x")


def test_articles_numbers_and_colours():
    assert parse_prompt("a photo of an orange circle.")["prompt"] == "a photo of an orange circle"
    assert parse_prompt("4 Triangles")["include"] == [{"class": "triangle", "count": 4}]
    assert parse_prompt("one diamond")["tag"] == "counting"
    assert parse_prompt("a diamond")["tag"] == "single_object"
    pos = parse_prompt("a red circle above a blue square")   # position may name colours
    assert pos["tag"] == "position" and pos["include"][1]["color"] == "red"


@pytest.mark.parametrize("prompt, reason", [
    ("a photo of a dog", "unknown shape 'dog'"),
    ("a photo of a pink circle", "unknown colour 'pink'"),
    ("two red circles", "counting prompts do not name a colour"),
    ("a circle and a circle", "two different shapes"),
    ("a red circle and a square", "colour for both objects or for neither"),
    ("a red circle and a red square", "different colours"),
    ("a circle and a square and a triangle", "at most two objects"),
    ("five circles", "unknown determiner or number 'five'"),
    ("a photo of", "names no object"),
    ("two circles left of a square", "single objects"),
])
def test_parse_errors_name_the_prompt_and_the_reason(prompt, reason):
    with pytest.raises(PromptParseError) as e:
        parse_prompt(prompt)
    assert repr(prompt) in str(e.value) and reason in str(e.value)


def test_text_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na photo of a red circle\n\nthree squares\n")
    specs = load_prompts(path)
    assert [s["tag"] for s in specs] == ["colors", "counting"]
    path.write_text("a photo of a circle\na photo of a horse\n")
    with pytest.raises(PromptParseError, match=r"prompts.txt:2: cannot parse prompt 'a photo of a horse'"):
        load_prompts(path)


def test_geneval_file_loads_as_is_and_shapes_only_rejects_it():
    specs = load_prompts(FIXTURE)
    assert len(specs) == 553 and sum(s["tag"] == "position" for s in specs) == 100
    assert specs[0] == json.loads(FIXTURE.read_text().splitlines()[0])
    with pytest.raises(SpecError, match=r"geneval_metadata.jsonl:1: .*'bench' is not a shapes-world shape"):
        load_prompts(FIXTURE, shapes_only=True)


def test_write_and_reload_prompts(tmp_path):
    specs = [all_specs(t)[1] for t in CATEGORIES]
    write_prompts(tmp_path / "p.jsonl", specs, extra=[{"seed": i} for i in range(len(specs))])
    back = load_prompts(tmp_path / "p.jsonl", shapes_only=True)
    assert [{k: v for k, v in b.items() if k != "seed"} for b in back] == specs
    write_prompts(tmp_path / "p.txt", specs, fmt="txt")
    assert load_prompts(tmp_path / "p.txt") == specs


def test_validate_spec_errors():
    with pytest.raises(SpecError, match="non-empty list"):
        validate_spec({"tag": "x", "include": []})
    with pytest.raises(SpecError, match="earlier include clause"):
        validate_spec({"include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]})
    with pytest.raises(SpecError, match="unknown key 'colour'"):
        validate_spec({"include": [{"class": "circle", "count": 1, "colour": "red"}]})
    with pytest.raises(SpecError, match="positive integer"):
        validate_spec({"include": [{"class": "circle", "count": 0}]})
    validate_spec({"include": [{"class": "dog", "count": 1}]}, shapes_only=False)
