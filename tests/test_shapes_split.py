"""The fixed train / held-out split: held-out combinations never reach training captions, atoms do."""
from __future__ import annotations

from selftok.shapes import (
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    all_specs,
    caption_variants,
    heldout_kinds,
    heldout_prompts,
    iter_examples,
    parse_prompt,
    split_of,
    split_specs,
)
from selftok.shapes.split import HELDOUT_KEYS, combination_keys


def test_split_partitions_every_category():
    for tag in CATEGORIES:
        train, held = split_specs("train", tag), split_specs("heldout", tag)
        if tag == "single_object":   # no combination to hold out: all four specs in both
            assert train == held == all_specs(tag) and len(train) == len(SHAPES)
            continue
        assert train and held and len(train) + len(held) == len(all_specs(tag))
        assert all(split_of(s) == "train" for s in train) and all(split_of(s) == "heldout" for s in held)


def test_heldout_kinds_name_what_a_spec_holds_out():
    assert heldout_kinds(parse_prompt("a photo of a circle and a triangle")) == ("pair",)
    assert heldout_kinds(parse_prompt("a photo of three circles")) == ("count",)
    assert heldout_kinds(parse_prompt("a photo of a red square and a blue diamond")) == ("color", "pair")
    assert heldout_kinds(parse_prompt("a photo of a circle above a square")) == ("relation",)
    assert heldout_kinds(parse_prompt("a photo of two circles")) == ()
    assert heldout_kinds(parse_prompt("a photo of a red circle and a blue square")) == ()


def test_no_heldout_combination_in_any_training_caption():
    for tag in CATEGORIES:
        for spec in split_specs("train", tag):
            for caption in caption_variants(spec):
                assert not combination_keys(parse_prompt(caption)) & HELDOUT_KEYS, caption
    # and every held-out spec carries at least one held-out combination
    for tag in CATEGORIES[1:]:
        assert all(combination_keys(s) & HELDOUT_KEYS for s in split_specs("heldout", tag))


def test_every_atom_occurs_in_training():
    train = [s for t in CATEGORIES for s in split_specs("train", t)]
    clauses = [c for s in train for c in s["include"]]
    assert {c["class"] for c in clauses} == set(SHAPES)
    assert {c["color"] for c in clauses if "color" in c} == set(COLORS)
    assert {c["count"] for s in train if s["tag"] == "counting" for c in s["include"]} == {1, 2, 3, 4}
    assert {c["position"][0] for c in clauses if "position" in c} == set(RELATIONS)
    # each held-out combination's parts occur in training: colours on other shapes, counts of other shapes,
    # both shapes of a held-out pair in other pairs, each relation on other pairs
    for key in HELDOUT_KEYS:
        if key[0] == "color":
            assert any(c.get("color") == key[1] for c in clauses)
            assert any(c["class"] == key[2] for c in clauses)
        if key[0] == "count":
            assert any(c["count"] == key[2] for c in clauses)
        if key[0] == "pair":
            assert all(any(("pair", *sorted((k, o))) not in HELDOUT_KEYS for o in SHAPES if o != k)
                       for k in key[1:])


def test_heldout_evaluation_list_is_fixed_and_balanced():
    entries = heldout_prompts()
    assert entries == heldout_prompts() and len(entries) == 96
    assert {t: sum(e["tag"] == t for e in entries) for t in CATEGORIES} == {t: 16 for t in CATEGORIES}
    assert len({e["id"] for e in entries}) == 96 and len({e["seed"] for e in entries}) == 96
    for e in entries:
        spec = {k: v for k, v in e.items() if k not in ("id", "seed")}
        assert parse_prompt(e["prompt"]) == spec
        assert e["tag"] == "single_object" or split_of(spec) == "heldout"
    assert entries[0]["seed"] == 1000 and entries[-1]["seed"] == 6015
    assert len({e["prompt"] for e in entries if e["tag"] in ("position", "color_attr")}) == 32


def test_training_stream_never_shows_heldout_captions():
    for ex in iter_examples("train", seed=3, n=300):
        assert split_of(parse_prompt(ex.caption)) == "train" and split_of(ex.spec) == "train"
    held = [ex for ex in iter_examples("heldout", seed=3, n=60)]
    assert all(split_of(ex.spec) == "heldout" for ex in held if ex.tag != "single_object")
