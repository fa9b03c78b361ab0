"""Accuracy of the shapes-world program evaluator on rendered scenes, clean and perturbed.

    python benchmarks/bench_evaluator.py --n 1000 --seed 0 [--size 64] [--out bench.json]

For n scenes (examples of the train and held-out streams, alternating, categories balanced) it reports:
- the fraction judged correct against their own spec, and against their full-scene spec (attribute
  preservation): clean, JPEG quality 50, Gaussian blur sigma = 1 px, Gaussian noise sigma = 0.05 on [0, 1]
  pixels, and harder, informational perturbations (a global colour shift, a "soft" 2x down/up-sampling with
  blur like a weak tokenizer, JPEG quality 25, blur sigma = 2 px, noise sigma = 0.1);
- judged against a random *other* scene's spec: the pass rate, the rate at which that spec is actually true
  of the scene (judged on the scene's exact objects: "a photo of a circle" is true of any one-circle scene),
  the false-pass rate (passed although not true), and the pass rate against the other's full-scene spec;
- the fraction of edited scenes (one object's shape or colour changed, or one object removed) that fail
  their original full-scene spec.
Acceptance: clean >= 0.99; jpeg50, blur1, noise05 >= 0.95; mismatch pass rate <= 0.05.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from selftok.runtime.cli import setup_logging
from selftok.shapes import (
    COLORS,
    SHAPES,
    Scene,
    evaluate_image,
    judge,
    make_example,
    render_scene,
    scene_objects,
    scene_spec,
)

logger = logging.getLogger("bench_evaluator")


def jpeg(image: Image.Image, quality: int = 50) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def blur(image: Image.Image, sigma: float = 1.0) -> np.ndarray:
    a = np.asarray(image, dtype=np.float32) / 255.0
    return ndimage.gaussian_filter(a, sigma=(sigma, sigma, 0))


def noise(image: Image.Image, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    a = np.asarray(image, dtype=np.float32) / 255.0
    return np.clip(a + rng.normal(0.0, sigma, a.shape), 0.0, 1.0).astype(np.float32)


def color_shift(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A global per-channel offset of up to +-0.06 and 20% loss of saturation."""
    a = np.asarray(image, dtype=np.float32) / 255.0
    grey = a.mean(axis=2, keepdims=True)
    a = grey + 0.8 * (a - grey) + rng.uniform(-0.06, 0.06, size=3)
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def soft(image: Image.Image) -> Image.Image:
    """Half-resolution bilinear round trip followed by blur sigma 1.5 px at 64 px: soft edges."""
    w, h = image.size
    small = image.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    return Image.fromarray(np.round(blur(small, 1.5 * w / 64) * 255).astype(np.uint8))


def edit_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one object's shape or colour changed, or (with 2+ objects) one object removed."""
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    kind = int(rng.integers(3 if len(objs) > 1 else 2))
    if kind == 2:
        return Scene(tuple(objs[:i] + objs[i + 1:]))
    o = objs[i]
    if kind == 0:
        objs[i] = dataclasses.replace(o, shape=str(rng.choice([s for s in SHAPES if s != o.shape])))
    else:
        objs[i] = dataclasses.replace(o, color=str(rng.choice([c for c in COLORS if c != o.color])))
    return Scene(tuple(objs))


def run(n: int, seed: int = 0, size: int = 64) -> dict[str, Any]:
    """All the rates above over `n` scenes; returns a JSON-ready dict."""
    rng = np.random.default_rng(seed)
    examples = [make_example("train" if i % 2 == 0 else "heldout", i // 2, seed, size) for i in range(n)]
    perturb: dict[str, Callable[[Image.Image], Any]] = {
        "clean": lambda im: im, "jpeg50": jpeg, "blur1": blur, "noise05": lambda im: noise(im, rng),
        "color_shift": lambda im: color_shift(im, rng), "soft": soft,
        "jpeg25": lambda im: jpeg(im, 25), "blur2": lambda im: blur(im, 2.0),
        "noise10": lambda im: noise(im, rng, 0.10)}
    out: dict[str, Any] = {"n": n, "seed": seed, "size": size}
    failures: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for name, fn in perturb.items():
        own, full = 0, 0
        for ex in examples:
            img = fn(ex.image)
            j = evaluate_image(img, ex.spec)
            own += j.correct
            full += evaluate_image(img, scene_spec(ex.scene)).correct
            if not j.correct and len(failures.setdefault(name, [])) < 5:
                failures[name].append(f"{ex.id} {ex.prompt!r}: " + "; ".join(
                    f"{c.text} ({c.detail})" for c in j.claims if not c.passed))
        out[name] = own / n
        out[f"{name}_scene_spec"] = full / n
    # another scene's spec: a random other scene (not a fixed offset: categories rotate with the index)
    passed = true = false_pass = full_pass = 0
    for i, ex in enumerate(examples):
        k = int(rng.integers(n - 1))
        other = examples[k + (k >= i)]
        p = evaluate_image(ex.image, other.spec).correct
        t = judge(scene_objects(ex.scene), other.spec)[0]
        passed, true, false_pass = passed + p, true + t, false_pass + (p and not t)
        full_pass += evaluate_image(ex.image, scene_spec(other.scene)).correct
    out.update(mismatch_pass=passed / n, mismatch_true=true / n, mismatch_false_pass=false_pass / n,
               mismatch_scene_spec_pass=full_pass / n)
    # sensitivity: one object's shape or colour changed, or one object removed -> the full-scene spec fails
    caught = 0
    for ex in examples:
        edited = edit_scene(ex.scene, rng)
        caught += not evaluate_image(render_scene(edited, size), scene_spec(ex.scene)).correct
    out["edit_caught"] = caught / n
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["ms_per_judgement"] = round(1000 * out["seconds"] / (n * (2 * len(perturb) + 3)), 2)
    out["failures"] = failures
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    setup_logging()
    res = run(args.n, args.seed, args.size)
    for k, v in res.items():
        if k != "failures":
            logger.info("%-22s %s", k, f"{v:.4f}" if isinstance(v, float) else v)
    for k, v in res["failures"].items():
        for line in v:
            logger.info("failure %-12s %s", k, line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
