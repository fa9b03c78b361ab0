"""Held-out evaluation of a tokenizer during and after training.

For each held-out image: tokenize, reconstruct with the diffusion decoder (`decoder_steps` Euler steps, fixed
noise seed) or the renderer, then measure PSNR (8-bit, as the official evaluator) and SSIM; on the shapes
world also **attribute preservation** — the shapes evaluator judges the reconstruction against its own
scene's full spec (every object's shape, colour, count and robust relative position) — and **per-object shape
accuracy** with its confusion table (each true object against the detection nearest its centre); optional LPIPS when
local weights are given. Codebook health on held-out data: codes used (fraction of the codebook),
perplexity of the code histogram, and the mean per-position perplexity (a collapsed position has ≈ 1).
Writes ``<stage>_step<N>.json`` and a PNG grid (rows of original | reconstruction pairs). The tokenizer is
left in eval mode; the trainer restores the modes of the stage it runs.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from selftok.data.images import TransformConfig
from selftok.data.sources import DataConfig, ImageSource, ShapesSourceConfig, collate_samples
from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.grid import save_grid, to_pil_images
from selftok.shapes import SHAPES, Scene, detect_objects, evaluate_image
from selftok.training.metrics import psnr, ssim

log = logging.getLogger(__name__)


def _heldout_shapes() -> DataConfig:
    return DataConfig(kind="shapes", shapes=ShapesSourceConfig(split="heldout", n=500, seed=0, size=64),
                      transform=TransformConfig(image_size=64))


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    data: DataConfig = field(default_factory=_heldout_shapes)
    """Held-out images (default: 500 scenes of the shapes world's held-out split)."""
    num_images: int = 500
    """Held-out images to evaluate (0 = no evaluation)."""
    every: int = 0
    """Also evaluate every this many steps during a stage (0 = only at the end of each stage)."""
    decoder_steps: int = 25
    """Euler steps of the diffusion decoder (official sampler: 50)."""
    batch_size: int = 100
    grid_images: int = 16
    attributes: bool = True
    """Judge reconstructions with the shapes evaluator when samples carry a scene spec."""
    lpips_weights: str | None = None
    """Local LPIPS weights (see `selftok.training.perceptual`); None = no LPIPS."""
    seed: int = 0
    """Seed of the decoder's starting noise."""

    def __post_init__(self) -> None:
        if self.num_images < 0 or self.batch_size < 1 or self.decoder_steps < 1:
            raise ValueError("eval.num_images must be >= 0, eval.batch_size and eval.decoder_steps positive")


class HeldOut:
    """The held-out images (decoded once) and their scene specs."""

    def __init__(self, cfg: EvalConfig):
        source = ImageSource(cfg.data)
        n = min(cfg.num_images, len(source))
        batch = collate_samples([source[i] for i in range(n)], source.image_size)
        self.pixels = batch.pixels                      # (N, 3, S, S) uint8
        self.ids = batch.ids
        self.specs = [json.loads(m).get("scene_spec") if m else None for m in batch.meta]
        self.scenes = [Scene.from_json(json.dumps(json.loads(m)["scene"])) if m and "scene" in json.loads(m)
                       else None for m in batch.meta]
        self.rejected = len(batch.rejects)

    def __len__(self) -> int:
        return len(self.ids)


def code_statistics(codes: Tensor, codebook_size: int) -> dict[str, float]:
    """Usage of the codebook by held-out codes (N, K): fraction used, histogram perplexity, and the mean
    per-position perplexity (exp of the entropy of each position's code histogram)."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum()
    ppl = math.exp(-float((p[p > 0] * p[p > 0].log()).sum()))
    pos = []
    for k in range(codes.shape[1]):
        c = torch.bincount(codes[:, k], minlength=codebook_size).double()
        q = c[c > 0] / c.sum()
        pos.append(math.exp(-float((q * q.log()).sum())))
    return {"codes_used": int((counts > 0).sum()), "codes_used_fraction": float((counts > 0).double().mean()),
            "perplexity": ppl, "position_perplexity": float(np.mean(pos))}


@torch.no_grad()
def reconstruct(tok: SelftokTokenizer, codes: Tensor, which: Literal["decoder", "renderer"], steps: int,
                seed: int, batch_size: int, autocast: bool) -> Tensor:
    """Codes (N, K) → images (N, 3, S, S) in [0, 1], in batches (fixed noise per batch for the decoder)."""
    out = []
    device = next(tok.parameters()).device
    for i in range(0, codes.shape[0], batch_size):
        c = codes[i:i + batch_size].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            if which == "decoder":
                out.append(tok.decode(c, steps=steps, generator=torch.Generator(device).manual_seed(seed + i)).float())
            else:
                out.append(tok.render(c).float())
    return torch.cat(out).cpu()


def judge_attributes(images: Tensor, specs: list) -> list[bool | None]:
    """Shapes-world attribute preservation per image (None where the sample has no scene spec)."""

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [None if s is None else bool(evaluate_image(a, s).correct) for a, s in zip(arr, specs)]


MISSED = "missed"
"""The confusion table's column for a true object with no detection near its centre (or none of a shape)."""


def shape_confusion(images: Tensor, scenes: list[Scene | None]) -> dict[str, dict[str, int]]:
    """True shape → read shape → count over every object of every scene: each object is read as the shape of
    the detection whose centre lies nearest its own, within half the object's side (else `MISSED`; a
    detection matches one object at most). Images without a scene are skipped."""
    table = {t: {r: 0 for r in (*SHAPES, MISSED)} for t in SHAPES}
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for a, scene in zip(arr, scenes):
        if scene is None:
            continue
        free = list(detect_objects(a))
        for o in scene.objects:
            dist = [math.hypot((d.box[0] + d.box[2]) / 2 - o.cx, (d.box[1] + d.box[3]) / 2 - o.cy) for d in free]
            j = int(np.argmin(dist)) if dist else -1
            if j >= 0 and dist[j] <= o.size / 2:
                read = free.pop(j).shape
                table[o.shape][read if read in SHAPES else MISSED] += 1
            else:
                table[o.shape][MISSED] += 1
    return table


def shape_accuracy(table: dict[str, dict[str, int]]) -> float:
    """Fraction of objects read as their own shape (`shape_confusion`)."""
    total = sum(sum(row.values()) for row in table.values())
    return sum(table[t][t] for t in table) / total if total else float("nan")


def save_pairs(originals: Tensor, recons: Tensor, path: Path, n: int, per_row: int = 4) -> None:
    """PNG of `n` (original | reconstruction) pairs, `per_row` pairs per row; inputs (N, 3, S, S) in [0, 1]."""
    n = min(n, originals.shape[0])
    pairs = torch.stack([originals[:n], recons[:n]], dim=1).flatten(0, 1)  # o0, r0, o1, r1, ...
    save_grid(to_pil_images(pairs), path, ncols=2 * min(per_row, n), pad=0)


EVAL_FILE = re.compile(r"(stage\d)_step0*(\d+)(?:_(\w+))?\.(json|png)")


def last_evaluations(eval_dir: Path) -> dict[str, tuple[int, list[Path]]]:
    """{stage: (step, files)} of each stage's last held-out evaluation in `eval_dir`: the files named
    ``<stage>_step<N>[_<part>].json|png`` at the largest N (numerically: step 500 comes before 3000)."""
    found: dict[str, dict[int, list[Path]]] = {}
    for path in Path(eval_dir).glob("stage*_step*"):
        m = EVAL_FILE.fullmatch(path.name)
        if m:
            found.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(path)
    return {stage: (max(steps), sorted(steps[max(steps)])) for stage, steps in sorted(found.items())}


def encode_heldout(tok: SelftokTokenizer, held: HeldOut, batch_size: int) -> Tensor:
    """Puts `tok` in eval mode and encodes the held-out images: (N, K) codes on the CPU, shared by the
    evaluations of every reconstruction path."""
    tok.eval()
    device = next(tok.parameters()).device
    images = held.pixels.float() / 255
    return torch.cat([tok.encode(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(held), batch_size)])


def evaluate_stage(tok: SelftokTokenizer, held: HeldOut, codes: Tensor, cfg: EvalConfig,
                   which: Literal["decoder", "renderer"], out_dir: Path, tag: str, autocast: bool = True,
                   lpips=None) -> dict[str, float]:
    """Evaluate one reconstruction path on the held-out set from its `codes` (`encode_heldout`); writes
    ``<tag>.json`` and ``<tag>.png``."""
    t0 = time.time()
    images = held.pixels.float() / 255
    recons = reconstruct(tok, codes, which, cfg.decoder_steps, cfg.seed, cfg.batch_size, autocast)
    metrics = {**code_statistics(codes, tok.codebook_size)}
    if which == "decoder":
        metrics["decoder_steps"] = cfg.decoder_steps
    return score_reconstructions(recons, held, cfg, which, out_dir, tag, metrics, t0, lpips)


@torch.no_grad()
def evaluate_autoencoder(tok: SelftokTokenizer, held: HeldOut, cfg: EvalConfig, out_dir: Path,
                         tag: str) -> dict[str, float]:
    """The learned latent autoencoder alone (images → latents → images) on the held-out set (stage 0)."""
    t0 = time.time()
    tok.latents.eval()
    device = next(tok.parameters()).device
    images = held.pixels.float() / 255
    recons = torch.cat([tok.latents.decode(tok.latents.encode(images[i:i + cfg.batch_size].to(device))).cpu()
                        for i in range(0, len(held), cfg.batch_size)])
    return score_reconstructions(recons, held, cfg, "autoencoder", out_dir, tag, {}, t0)


def score_reconstructions(recons: Tensor, held: HeldOut, cfg: EvalConfig, which: str, out_dir: Path, tag: str,
                          metrics: dict, t0: float, lpips=None) -> dict[str, float]:
    """PSNR, SSIM, attribute preservation and optional LPIPS of `recons` against the held-out images (added
    to `metrics`); writes ``<tag>.json`` and ``<tag>.png``."""
    images = held.pixels.float() / 255
    metrics = {"psnr": float(psnr(recons, images).mean()), "ssim": float(ssim(recons, images).mean()),
               "num_images": len(held), **metrics}
    if cfg.attributes and any(s is not None for s in held.specs):
        judged = [j for j in judge_attributes(recons, held.specs) if j is not None]
        metrics["attribute_preservation"] = float(np.mean(judged))
        metrics["attribute_images"] = len(judged)
    if cfg.attributes and any(s is not None for s in held.scenes):
        metrics["shape_confusion"] = shape_confusion(recons, held.scenes)
        metrics["shape_accuracy"] = shape_accuracy(metrics["shape_confusion"])
    if lpips is not None:
        with torch.no_grad():
            metrics["lpips"] = float(torch.cat([lpips(recons[i:i + cfg.batch_size], images[i:i + cfg.batch_size])
                                                for i in range(0, len(held), cfg.batch_size)]).mean())
    metrics["eval_seconds"] = time.time() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pairs(images, recons, out_dir / f"{tag}.png", cfg.grid_images)
    (out_dir / f"{tag}.json").write_text(json.dumps({"which": which, **metrics}, indent=2))
    log.info("eval %s (%s): %s", tag, which, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in metrics.items() if k != "shape_confusion"))
    return metrics
