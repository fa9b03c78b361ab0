"""Prompts and captions of the shapes world: spec builders, phrasings, the parser and prompt files.

Every spec has one canonical GenEval-style prompt ("a photo of a red circle") and several training
phrasings ("there is a red circle", "a drawing of a red circle", ...). `parse_prompt` reads any of them back
into the spec; `load_prompts` reads a plain-text file (one prompt per line, parsed) or a GenEval JSONL file
(specs as they are).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from selftok.shapes.spec import (
    COLORS,
    MAX_COUNT,
    MIRROR,
    RELATIONS,
    SHAPES,
    SpecError,
    clause,
    make_spec,
    validate_spec,
)

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
PREFIXES: tuple[str, ...] = ("a photo of ", "an image of ", "a picture of ", "a drawing of ", "there is ",
                             "there are ", "")
"""Training-caption prefixes ("there is"/"there are" agree with the first noun phrase)."""

RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

_DETERMINERS = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()},
                **{str(n): n for n in NUMBER_WORDS}}
_NP = re.compile(r"^(?P<det>\S+) (?:(?P<color>\S+) )?(?P<noun>\S+)$")
_EXAMPLE = "e.g. 'a photo of a red circle left of a blue square'"


class PromptParseError(ValueError):
    """A prompt outside the shapes-world grammar; the message names the prompt and the reason."""


# ---------------------------------------------------------------------------------------------- builders
def single_object_spec(shape: str) -> dict[str, Any]:
    return make_spec("single_object", [clause(shape)], "a photo of " + noun_phrase(shape))


def counting_spec(shape: str, count: int) -> dict[str, Any]:
    if not 1 <= count <= MAX_COUNT:
        raise SpecError(f"counting specs take 1..{MAX_COUNT} objects, got {count}")
    return make_spec("counting", [clause(shape, count)],
                     "a photo of " + noun_phrase(shape, count, numeral="word"))


def colors_spec(shape: str, color: str) -> dict[str, Any]:
    return make_spec("colors", [clause(shape, color=color)], "a photo of " + noun_phrase(shape, color=color))


def two_object_spec(first: str, second: str) -> dict[str, Any]:
    _check_distinct(first, second)
    return make_spec("two_object", [clause(first), clause(second)],
                     f"a photo of {noun_phrase(first)} and {noun_phrase(second)}")


def color_attr_spec(first: str, first_color: str, second: str, second_color: str) -> dict[str, Any]:
    _check_distinct(first, second)
    if first_color == second_color:
        raise SpecError(f"color_attr specs name two different colours, got {first_color!r} twice")
    return make_spec("color_attr", [clause(first, color=first_color), clause(second, color=second_color)],
                     f"a photo of {noun_phrase(first, color=first_color)} and "
                     f"{noun_phrase(second, color=second_color)}")


def position_spec(subject: str, relation: str, reference: str, subject_color: str | None = None,
                  reference_color: str | None = None) -> dict[str, Any]:
    """"A `relation` B" in GenEval's layout: clause 0 is the reference B, clause 1 the subject A."""
    _check_distinct(subject, reference)
    if relation not in RELATIONS:
        raise SpecError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
    include = [clause(reference, color=reference_color),
               clause(subject, color=subject_color, position=(relation, 0))]
    prompt = (f"a photo of {noun_phrase(subject, color=subject_color)} {relation} "
              f"{noun_phrase(reference, color=reference_color)}")
    return make_spec("position", include, prompt)


def _check_distinct(a: str, b: str) -> None:
    if a == b:
        # GenEval matches both clauses to the same detections, so "a circle and a circle" cannot be judged.
        raise SpecError(f"two-object specs need two different shapes, got {a!r} twice")


def noun_phrase(shape: str, count: int = 1, color: str | None = None, numeral: str = "article") -> str:
    """"a circle", "an orange square", "two triangles", "3 red diamonds", "one circle".

    numeral: "article" (a/an for one object, number words otherwise), "word" or "digit".
    """
    if shape not in SHAPES:
        raise SpecError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    if color is not None and color not in COLORS:
        raise SpecError(f"unknown colour {color!r}; known colours: {', '.join(COLORS)}")
    words = ([color] if color else []) + [shape + ("s" if count > 1 else "")]
    if numeral == "digit":
        det = str(count)
    elif numeral == "word" or count > 1:
        det = NUMBER_WORDS[count]
    else:
        det = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([det] + words)


# ---------------------------------------------------------------------------------------------- captions
def caption_variants(spec: dict[str, Any]) -> list[str]:
    """Every training phrasing of a shapes-world spec of one of the six categories (deterministic order)."""
    tag, inc = spec["tag"], spec["include"]
    if tag in ("single_object", "colors"):
        bodies = [noun_phrase(inc[0]["class"], color=inc[0].get("color"))]
    elif tag == "counting":
        bodies = [noun_phrase(inc[0]["class"], inc[0]["count"], numeral=n) for n in ("word", "digit")]
    elif tag in ("two_object", "color_attr"):
        a, b = (noun_phrase(c["class"], color=c.get("color")) for c in inc)
        bodies = [f"{a} and {b}", f"{b} and {a}"]
    elif tag == "position":
        ref, sub = (noun_phrase(c["class"], color=c.get("color")) for c in inc)
        rel = inc[1]["position"][0]
        bodies = [f"{sub} {p} {ref}" for p in RELATION_PHRASES[rel]]
        bodies += [f"{ref} {p} {sub}" for p in RELATION_PHRASES[MIRROR[rel]]]
    else:
        raise SpecError(f"no captions for tag {tag!r}; categories: single_object, two_object, counting, "
                        "colors, position, color_attr")
    plural = inc[0]["count"] > 1 and tag == "counting"
    prefixes = [p for p in PREFIXES if p != ("there is " if plural else "there are ")]
    return [p + b for b in bodies for p in prefixes]


def sample_caption(spec: dict[str, Any], rng: random.Random) -> str:
    """One training phrasing of `spec`, drawn with `rng`."""
    return rng.choice(caption_variants(spec))


# ---------------------------------------------------------------------------------------------- parsing
def parse_prompt(text: str) -> dict[str, Any]:
    """The exact shapes-world spec of a prompt or caption; raises `PromptParseError` naming the prompt.

    The returned spec's `prompt` is the canonical phrasing; `text` itself is not kept.
    """
    if not isinstance(text, str):
        raise PromptParseError(f"a prompt must be a string, got {type(text).__name__}")
    try:
        return _parse(text)
    except (PromptParseError, SpecError) as e:
        raise PromptParseError(f"cannot parse prompt {text!r}: {e}") from None


def _parse(text: str) -> dict[str, Any]:
    s = " ".join(text.lower().replace(",", " ").split()).rstrip(".").strip()
    for prefix in PREFIXES[:-1]:
        if (s + " ").startswith(prefix):
            s = s[len(prefix):]
            break
    if not s:
        raise PromptParseError(f"it names no object ({_EXAMPLE})")
    relation_hits = [(s.find(f" {p} "), p, rel) for rel, ps in RELATION_PHRASES.items() for p in ps
                     if f" {p} " in s]
    if relation_hits:
        # the longest phrase at the earliest place wins ("to the left of" contains "left of")
        at, phrase, rel = min(relation_hits, key=lambda h: (h[0], -len(h[1])))
        subject, reference = _noun(s[:at]), _noun(s[at + len(phrase) + 2:])
        for np_ in (subject, reference):
            if np_[1] != 1:
                raise PromptParseError("position prompts relate single objects")
        return position_spec(subject[0], rel, reference[0], subject[2], reference[2])
    parts = s.split(" and ")
    if len(parts) == 2:
        (a, na, ca), (b, nb, cb) = _noun(parts[0]), _noun(parts[1])
        if na != 1 or nb != 1:
            raise PromptParseError("two-object prompts name one of each object")
        if ca is None and cb is None:
            return two_object_spec(a, b)
        if ca is None or cb is None:
            raise PromptParseError("name a colour for both objects or for neither")
        return color_attr_spec(a, ca, b, cb)
    if len(parts) > 2:
        raise PromptParseError("at most two objects per prompt")
    shape, count, color = _noun(s, single=True)
    numbered = s.split(" ", 1)[0] not in ("a", "an")
    if numbered:
        if color is not None:
            raise PromptParseError("counting prompts do not name a colour")
        return counting_spec(shape, count)
    return colors_spec(shape, color) if color else single_object_spec(shape)


def _noun(phrase: str, single: bool = False) -> tuple[str, int, str | None]:
    """Parse "a red circle" / "three squares" into (shape, count, colour or None)."""
    m = _NP.match(phrase.strip())
    if not m:
        raise PromptParseError(f"{phrase.strip()!r} is not a noun phrase like 'a red circle' or "
                               f"'three squares' ({_EXAMPLE})")
    det, color, noun = m["det"], m["color"], m["noun"]
    if det not in _DETERMINERS:
        raise PromptParseError(f"unknown determiner or number {det!r} (use a/an, one..four or 1..4)")
    if color is not None and color not in COLORS:
        raise PromptParseError(f"unknown colour {color!r}; known colours: {', '.join(COLORS)}")
    shape = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
    if shape not in SHAPES:
        raise PromptParseError(f"unknown shape {noun!r}; known shapes: {', '.join(SHAPES)}")
    return shape, _DETERMINERS[det], color


# ---------------------------------------------------------------------------------------------- prompt files
def load_prompts(path: str | Path, shapes_only: bool = False) -> list[dict[str, Any]]:
    """Specs from a prompt file: GenEval JSONL (one spec per line, used as is) or plain text (one prompt per
    line, parsed by the grammar; blank lines and lines starting with '#' skipped).

    With `shapes_only`, JSONL specs naming classes or colours outside the shapes world are an error (the
    program evaluator cannot judge them). Errors name the file, the line and the prompt.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next((ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    specs = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl" or first.startswith("{"):
            try:
                spec = json.loads(line)
                specs.append(validate_spec(spec, shapes_only=shapes_only))
            except (json.JSONDecodeError, SpecError) as e:
                raise SpecError(f"{path}:{lineno}: {e}") from None
        else:
            try:
                specs.append(parse_prompt(line))
            except PromptParseError as e:
                raise PromptParseError(f"{path}:{lineno}: {e}") from None
    return specs


def write_prompts(path: str | Path, specs: list[dict[str, Any]], fmt: str = "jsonl",
                  extra: list[dict[str, Any]] | None = None) -> None:
    """Write specs as GenEval JSONL (`extra[i]` keys, e.g. a seed, are added to line i) or plain text."""
    path = Path(path)
    if fmt == "txt":
        path.write_text("".join(s["prompt"] + "\n" for s in specs), encoding="utf-8")
    elif fmt == "jsonl":
        rows = [{**s, **(extra[i] if extra else {})} for i, s in enumerate(specs)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        raise ValueError(f"unknown prompt file format {fmt!r}; use 'jsonl' or 'txt'")
