"""Shapes-world evaluation of a trained VLM: text→image on the held-out prompts, scored per category by the
program evaluator, and image→text on held-out scenes, scored by whether each caption is true of its scene.

Caption accuracy: the caption is parsed by the shapes grammar (`parse_prompt`, which gives an *exact* spec:
the named objects and nothing else) and judged against the scene's true objects (`scene_objects`, no
detector involved); unparseable captions count as wrong. `exact_match` is the stricter share of captions whose
spec equals the spec the scene was drawn from. `per_heldout_kind` splits the accuracy by the kinds of held-out
combination a scene shows (`heldout_kinds`: pair, count, colour, relation; "none" for the single objects that
both splits share and for training compositions).

Captions are measured twice: on held-out scenes (compositions no training caption or image shows; the figure
the demo's acceptance uses) and on fresh scenes of *training* compositions (new images, seen compositions:
stream seed `SEEN_STREAM_OFFSET + seed` of the train split, which no pretokenize config trains on). The second
separates "cannot read an unseen image" from "cannot name an unseen composition".
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from selftok.runtime.grid import pil_to_tensor
from selftok.runtime.io import write_atomic
from selftok.shapes import (
    PromptParseError,
    category_means,
    evaluate_folder,
    heldout_kinds,
    heldout_prompts,
    judge,
    make_example,
    parse_prompt,
    scene_objects,
    spec_signature,
)
from vlm.pipeline import Pipeline, write_t2i
from vlm.sampler import generate_text, image_seed
from vlm.sampling import SamplingPolicy

log = logging.getLogger(__name__)

SEEN_STREAM_OFFSET = 1000
"""The seen-composition captions use train-split stream seed 1000 + the caption seed (training data: seed 0)."""


def evaluate_t2i(pipe: Pipeline, policy: SamplingPolicy, out: Path, record: dict[str, Any], n_per_prompt: int = 1,
                 decoder: str = "renderer", steps: int = 50, batch_size: int = 16) -> dict[str, Any]:
    """Generate for the 96 held-out prompts (seeds from each entry's fixed seed) and score the images."""
    entries = heldout_prompts()
    rows = [{"prompt": e["prompt"], "spec": e} for e in entries]
    seeds = [image_seed(e["seed"], e["prompt"], j) for e in entries for j in range(n_per_prompt)]
    write_t2i(pipe, rows, policy, n_per_prompt, out, record, decoder, steps, batch_size, seeds=seeds)
    report = evaluate_folder(out / "images")
    write_atomic(out / "t2i_report.json", json.dumps(report, indent=2) + "\n")
    return {"overall": report["overall"], "overall_standard_error": report["overall_standard_error"],
            "per_category": report["per_category"], "n_images": report["n_images"], "claims": report["claims"]}


def caption_verdict(caption: str, example: Any) -> dict[str, Any]:
    """Is `caption` true of the example's scene (and does it name exactly the scene's source spec)?"""
    try:
        spec = parse_prompt(caption)
    except PromptParseError as e:
        return {"correct": False, "exact_match": False, "error": str(e)}
    correct, _ = judge(scene_objects(example.scene), spec)
    return {"correct": bool(correct), "exact_match": spec_signature(spec) == spec_signature(example.spec)}


@torch.no_grad()
def evaluate_captions(pipe: Pipeline, n: int, batch_size: int = 16, max_new_tokens: int = 32,
                      policy: SamplingPolicy | None = None, seed: int = 0, split: str = "heldout") -> dict[str, Any]:
    """Caption the first `n` scenes of the `split` stream of seed `seed` and score the captions."""
    size = pipe.image_tokenizer.cfg.image_size
    examples = [make_example(split, i, seed=seed, size=size) for i in range(n)]
    device = next(pipe.image_tokenizer.parameters()).device
    codes = torch.cat([pipe.image_tokenizer.encode(pil_to_tensor([e.image for e in examples[s:s + batch_size]])
                                                   .to(device)) for s in range(0, n, batch_size)])
    texts = generate_text(pipe.model, pipe.vocab, pipe.text_tokenizer, codes.to(next(pipe.model.parameters()).device),
                          policy, None, max_new_tokens, [image_seed(seed, e.id, 0) for e in examples], batch_size,
                          progress=True)
    rows = [{"id": e.id, "tag": e.tag, "heldout": "+".join(heldout_kinds(e.spec)) or "none", "truth": e.caption,
             "caption": t, **caption_verdict(t, e)} for e, t in zip(examples, texts)]
    return {"accuracy": sum(r["correct"] for r in rows) / max(n, 1),
            "exact_match": sum(r["exact_match"] for r in rows) / max(n, 1),
            "parse_errors": sum("error" in r for r in rows), "n": n,
            "per_category": accuracy_by(rows, "tag"), "per_heldout_kind": accuracy_by(rows, "heldout"),
            "captions": rows}


def accuracy_by(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Share of correct rows per value of `key` (`category_means`' per-group means)."""
    return category_means((r[key], float(r["correct"])) for r in rows)[1]


def evaluate_shapes(pipe: Pipeline, policy: SamplingPolicy, out: Path, record: dict[str, Any],
                    n_per_prompt: int = 1, n_captions: int = 96, decoder: str = "renderer", steps: int = 50,
                    batch_size: int = 16, max_new_tokens: int = 32, caption_seed: int = 0) -> dict[str, Any]:
    """Both evaluations → out/summary.json (+ images, t2i_report.json, captions.json, captions_seen.json).
    Captions are of the held-out scenes of stream seed `caption_seed` (0: the evaluation's; another seed gives
    other scenes of the same held-out combinations, a development set for choosing settings), and of as many
    fresh scenes of training compositions (`SEEN_STREAM_OFFSET`)."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"t2i": evaluate_t2i(pipe, policy, out, record, n_per_prompt, decoder, steps,
                                                   batch_size)}
    log.info("held-out t2i: overall %.3f (standard error over prompts %s) %s", summary["t2i"]["overall"],
             summary["t2i"]["overall_standard_error"], summary["t2i"]["per_category"])
    caption_sets = (("captions", "heldout", caption_seed),
                    ("captions_seen", "train", SEEN_STREAM_OFFSET + caption_seed))
    for key, split, seed in caption_sets if n_captions > 0 else ():
        captions = evaluate_captions(pipe, n_captions, batch_size, max_new_tokens, seed=seed, split=split)
        write_atomic(out / f"{key}.json", json.dumps(captions, indent=2) + "\n")
        summary[key] = {k: v for k, v in captions.items() if k != "captions"}
        log.info("%s captions: accuracy %.3f (exact %.3f)", "held-out" if split == "heldout" else "seen-composition",
                 captions["accuracy"], captions["exact_match"])
    summary["settings"] = {k: v for k, v in record.items() if k != "images"}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
