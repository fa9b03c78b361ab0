"""Held-out evaluation of a GRPO run: the held-out prompts at their fixed seeds, scored per category
(eval.jsonl), and a grid of the same prompts and seeds at every evaluation (samples/)."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image

from rl.rollout import render, sample_images
from rl.state import RLState
from selftok.runtime.grid import save_grid
from selftok.shapes import category_means, category_standard_errors, overall_standard_error
from vlm.sampler import image_seed

log = logging.getLogger(__name__)


def eval_entries(state: RLState) -> tuple[list[dict[str, Any]], list[int]]:
    """Held-out entries, each `samples_per_prompt` times, with the seeds `vlm.generate evaluate` uses (so the
    in-loop scores are the ones that command reports for the same weights and policy)."""
    n = state.cfg.eval.samples_per_prompt
    entries = [p for p in state.prompts.heldout for _ in range(n)]
    seeds = [image_seed(int(p["seed"]), p["prompt"], k) for p in state.prompts.heldout for k in range(n)]
    return entries, seeds


def evaluate(state: RLState) -> dict[str, Any]:
    """Score the held-out prompts at their fixed seeds; write eval.jsonl and a sample grid (main process)."""
    acc, step = state.accelerator, state.progress.step
    entries, seeds = eval_entries(state)
    n, W, r = len(entries), acc.num_processes, acc.process_index
    lo, hi = r * n // W, (r + 1) * n // W
    token_ids, _ = sample_images(state, [p["prompt"] for p in entries[lo:hi]], seeds[lo:hi]) if hi > lo else (
        torch.zeros(0, state.vocab.K, dtype=torch.long), None)
    images = render(state, token_ids) if hi > lo else []
    out = state.eval_reward(images, entries[lo:hi]) if images else None
    scores = gather_object(out.scores.tolist() if out else [])
    details = gather_object(out.details if out else [])
    grid_idx = grid_indices(state)
    grid = gather_object([(i, images[i - lo]) for i in grid_idx if lo <= i < hi])
    result = summarize_eval(entries, scores, details, state.cfg.eval.metric)
    result["step"] = step
    if acc.is_main_process:
        with (state.run_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        log_samples(state, [im for _, im in sorted(grid, key=lambda t: t[0])])
        acc.log({f"eval/{k}": v for k, v in result["per_category"].items()} | {"eval/overall": result["overall"]},
                step=step)
        log.info("eval step %d: overall %.3f %s", step, result["overall"],
                 " ".join(f"{k}={v:.2f}" for k, v in result["per_category"].items()))
    return result


def summarize_eval(entries: Sequence[dict[str, Any]], scores: Sequence[float], details: Sequence[dict[str, Any]],
                   metric: str) -> dict[str, Any]:
    """Per-category mean (accuracy for the program metric) and overall = mean of the categories (GenEval)."""
    rows = [(str(e.get("tag", "text")), str(e.get("prompt")), float(d.get("correct", False)) if metric == "program"
             else s) for e, s, d in zip(entries, scores, details)]
    rows = [r for r in rows if math.isfinite(r[2])]
    overall, cats, counts = category_means((tag, v) for tag, _, v in rows)
    return {"overall": overall, "per_category": cats, "counts": counts, "n": len(entries),
            "overall_standard_error": overall_standard_error(rows),
            "per_category_standard_error": category_standard_errors(rows)}


def grid_indices(state: RLState) -> list[int]:
    """Entries shown in the sample grids: an even spread of held-out prompts, their first sample."""
    held, n = state.prompts.heldout, state.cfg.eval.samples_per_prompt
    k = min(state.cfg.eval.grid_prompts, len(held))
    return [((i * len(held)) // k) * n for i in range(k)]


def log_samples(state: RLState, images: Sequence[Image.Image]) -> None:
    """samples/step_XXXXXXXX.png (and TensorBoard): the same held-out prompts and seeds at every evaluation."""
    if not images:
        return
    grid = save_grid(images, state.run_dir / "samples" / f"step_{state.progress.step:08d}.png",
                     ncols=min(len(images), 6))
    tracker = state.accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        tracker.add_image("samples/heldout", np.asarray(grid), state.progress.step, dataformats="HWC")
