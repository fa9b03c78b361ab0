"""One step's rollout: sample visual tokens with the run's policy from the current weights, render them with
the one-step renderer, score them with the reward."""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor

from rl.prompts import schedule_prompts
from rl.state import RLState
from selftok.runtime.grid import to_pil_images
from vlm.sampler import decode_codes, generate_image_tokens
from vlm.vocab import ar_to_encoder_order


class Rollout(NamedTuple):
    prompts: list[dict[str, Any]]   # B prompt items (groups of G consecutive)
    seeds: list[int]                # B sampling seeds
    token_ids: Tensor               # (B, K) sampled visual ids, AR order
    logprobs: Tensor                # (B, K) fp32 sampler log-probs under the policy
    images: list[Image.Image]       # B rendered images
    rewards: Tensor                 # (B,) fp32, NaN/inf = unscorable
    details: list[dict[str, Any]]   # B reward details


def render(state: RLState, token_ids: Tensor) -> list[Image.Image]:
    """AR-ordered visual ids (B, K) -> rendered PIL images (one renderer pass; codes flipped to encoder order)."""
    codes = ar_to_encoder_order(state.vocab.ids_to_codes(token_ids))
    images = decode_codes(state.image_tokenizer, codes, "renderer", batch_size=state.cfg.policy.render_batch_size)
    return to_pil_images(images)


def sample_images(state: RLState, captions: list[str], seeds: list[int]) -> tuple[Tensor, Tensor]:
    """Sample with the run's policy from the current weights: (token_ids (B, K), logprobs (B, K))."""
    acc = state.accelerator
    model = acc.unwrap_model(state.model)
    was_training = model.training
    model.eval()
    with torch.no_grad(), acc.autocast():
        out = generate_image_tokens(model, state.vocab, state.text_tokenizer, captions,
                                    state.cfg.rollout.sampling, seeds, batch_size=state.cfg.rollout.gen_batch_size)
    model.train(was_training)
    return out.token_ids[:, :state.vocab.K], out.logprobs


def rollout_seeds(seed: int, step: int, first_slot: int, n: int) -> list[int]:
    """Distinct sampling seeds per (run seed, step, global sample slot)."""
    return [(seed * 1_000_003 + step) * 1_048_576 + first_slot + j for j in range(n)]


def collect_rollout(state: RLState, step: int, timings: dict[str, float]) -> Rollout:
    """This process's share of step `step`: prompts, samples, renders and rewards."""
    cfg, acc = state.cfg, state.accelerator
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    if state.curriculum is not None:
        everyone = state.curriculum.schedule(step, P * acc.num_processes, cfg.run.seed)
    else:
        everyone = schedule_prompts(state.prompts.train, step, P * acc.num_processes, cfg.run.seed,
                                    cfg.prompts.balance)
    mine = everyone[acc.process_index * P:(acc.process_index + 1) * P]
    prompts = [p for p in mine for _ in range(G)]
    seeds = rollout_seeds(cfg.run.seed, step, acc.process_index * P * G, P * G)
    t0 = time.perf_counter()
    token_ids, logprobs = sample_images(state, [p["prompt"] for p in prompts], seeds)
    t1 = time.perf_counter()
    images = render(state, token_ids)
    t2 = time.perf_counter()
    out = state.reward(images, prompts)
    t3 = time.perf_counter()
    timings.update(rollout_s=t1 - t0, render_s=t2 - t1, reward_s=t3 - t2)
    return Rollout(prompts, seeds, token_ids, logprobs, images, out.scores.float(), out.details)
