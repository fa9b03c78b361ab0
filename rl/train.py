"""GRPO over visual tokens ("Selftok-Zero"): rollout → render → reward → advantages → update.

    python -m rl.train --config configs/rl_shapes.yaml [key.sub=value ...]
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m rl.train --config ...      (CPU, 2 processes)
    accelerate launch -m rl.train --config configs/rl_geneval.yaml                  (GPUs)

Each step: every process samples ``rollout.batch_size`` images (``batch_size / group_size`` prompts, each
``group_size`` times, groups consecutive) with the run's `SamplingPolicy`, decodes them with the one-step
renderer, scores them with the reward, and updates the policy with the GRPO loss (`rl.grpo`) for
``update.epochs`` passes of mini-batches, accumulating gradients over micro-batches.

**On-policy log-probabilities.** Log-probs are computed with `vlm.sampler.score_tokens`, i.e. with the
same `vlm.sampling.policy_logprobs` the sampler drew from: the visual-vocabulary mask, temperature,
top-k/top-p and — for guided rollouts — the CFG-mixed distribution ``uncond + s·(cond − uncond)``. The
gradient flows through both the conditional and the unconditional rows, because the policy that produced
the images *is* the guided distribution; training the unguided conditional log-probs (what most RL stacks
for AR image models do) optimises a different distribution from the one sampled, which is off-policy. The
same function gives the reference log-probs for the KL term, so KL is measured between guided policies.

**Why not TRL's GRPOTrainer.** TRL 1.16 recomputes log-probs with a full-vocabulary softmax of one
unguided forward (``_get_per_token_logps_and_entropies``): no visual mask, no CFG — off-policy for this
sampler. Its rewards see decoded text, not rendered images; its checkpoints are HF Trainer state rather
than the atomic accelerate state with exact prompt and RNG position that `selftok.runtime.runs` provides; and its
batching assumes one sequence per sample, while a guided sample is two rows. Replacing those pieces would
leave only the outer loop, so this module owns the loop and keeps the math as pure, tested functions in
`rl.grpo` (the same k3 KL and clipped ratio as TRL's ``loss_type="grpo"``).

Multi-process: prompt groups never straddle processes; rewards are gathered so group statistics (and the
"batch" advantage scale) are computed over the global batch exactly as on one process.

Run directory: config.yaml, checkpoints/ (accelerate state + step), tb/, metrics.jsonl, rollouts.jsonl
(prompts and rewards of every step), eval.jsonl (held-out scores per category), samples/ (grids of the same
held-out prompts and seeds over time), final/ (the fine-tuned VLM, loadable like `vlm.train`'s final/).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from rl.grpo import AdvantageScale, entropy_estimate, group_advantages, grpo_loss
from rl.prompts import PromptsConfig, PromptSets, build_prompt_sets, schedule_prompts
from rl.rewards import Reward, RewardConfig, ShapesReward, build_reward
from selftok.runtime import runs
from selftok.runtime.cli import entry_point, parse_run_config, run_parser, setup_logging
from selftok.runtime.config import ConfigError, to_dict
from selftok.runtime.grid import save_grid, to_pil_images
from selftok.runtime.launch import make_accelerator
from selftok.shapes import category_means
from vlm.model import LoraSpec, ModelConfig, apply_training_mode, export_model
from vlm.pipeline import load_pipeline
from vlm.sampler import (
    allowed_ids,
    decode_codes,
    generate_image_tokens,
    image_seed,
    max_prompt_tokens,
    score_tokens,
    t2i_prompt_ids,
    uncond_prompt_ids,
)
from vlm.sampling import SamplingPolicy
from vlm.vocab import Vocabulary, ar_to_encoder_order

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class PolicyConfig:
    vlm_path: str = ""
    """Folder of the VLM to fine-tune: `vlm.train`'s final/ (HF model + text tokenizer + vocab.json)."""
    tokenizer_path: str = ""
    """Folder of the Selftok tokenizer with a renderer (`SelftokTokenizer.save_pretrained`)."""
    vae_path: str | None = None
    """Local SD3-VAE folder for tokenizers in the sd3_vae latent space."""
    mode: Literal["full", "lora"] = "full"
    """full: every weight trains and the reference is a frozen copy; lora: adapters (plus trainable visual
    rows) and the reference is the same model with the adapters disabled."""
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)
    render_batch_size: int = 64
    """Images per renderer forward."""
    attn_implementation: str | None = None
    """transformers attention of the policy: None = transformers' default (sdpa); "eager" makes the CPU update
    faster (torch's CPU flash-attention backward is slow on short rows)."""


@dataclasses.dataclass
class RolloutConfig:
    batch_size: int = 16
    """Images sampled per process per step (= prompts per step × group_size)."""
    group_size: int = 4
    """G: samples per prompt; advantages are relative to the group."""
    sampling: SamplingPolicy = dataclasses.field(default_factory=SamplingPolicy)
    """The sampling policy (CFG, temperature, top-k/p, vocabulary); log-probs are computed under it."""
    gen_batch_size: int = 64
    """Images per sampler call (rows of the KV-cached loop; twice as many with CFG)."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (group-relative advantages), got {self.group_size}")
        if self.batch_size < 1 or self.batch_size % self.group_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of group_size "
                             f"({self.group_size})")
        if self.sampling.vocabulary == "text":
            raise ValueError("rollout.sampling.vocabulary must be visual (or all) to sample images")

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size


@dataclasses.dataclass
class UpdateConfig:
    lr: float = 1e-5
    warmup_steps: int = 0
    """Linear warm-up of the learning rate; constant afterwards."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    epochs: int = 1
    """Policy epochs per rollout batch (> 1 reuses the batch with the clipped ratio)."""
    minibatch_size: int | None = None
    """Samples per optimizer step per process; None = the whole batch."""
    micro_batch_size: int = 16
    """Samples per forward/backward (gradient accumulation inside a mini-batch)."""
    beta: float = 0.0
    """KL weight (k3 estimator against the frozen reference); 0 skips the reference entirely."""
    eps_low: float = 0.2
    eps_high: float = 0.2
    advantage_scale: AdvantageScale = "group"
    skip_zero_advantage: bool = True
    """Skip the forward/backward of samples with advantage 0 (flat groups, dropped samples) when beta = 0 on
    a single process: their gradient is exactly 0, so this changes nothing but the time."""
    mixed_precision: Literal["no", "bf16"] = "bf16"
    max_steps: int = 100
    time_budget_s: float | None = None
    """Stop (checkpoint, evaluate, save) once this many seconds of RL steps (rollout, render, reward, update;
    not evaluations or checkpoints) have run in this process; None = no limit."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.micro_batch_size < 1 or self.max_steps < 1:
            raise ValueError("lr, epochs, micro_batch_size and max_steps must be positive")
        if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("beta, eps_low and eps_high must be >= 0")
        if self.advantage_scale not in ("group", "batch", "none"):
            raise ValueError(f"advantage_scale must be group, batch or none, got {self.advantage_scale!r}")


@dataclasses.dataclass
class EvalConfig:
    every: int = 20
    """Evaluate on the held-out prompts every this many steps (and at the start and the end); 0 = only
    at the start and the end."""
    samples_per_prompt: int = 1
    """Images per held-out prompt (seeds: the prompt's seed, then + 1_000_003 per extra sample)."""
    metric: Literal["program", "reward"] = "program"
    """program: the shapes evaluator's GenEval-style accuracy (strict, no partial credit); reward: the mean
    training reward (for prompts the program cannot judge)."""
    grid_prompts: int = 12
    """Held-out prompts shown in the sample grids (an even spread through the list, first sample each)."""
    at_start: bool = True


@dataclasses.dataclass
class RLConfig:
    output_dir: str = "runs/rl"
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    rewards: list[RewardConfig] = dataclasses.field(default_factory=lambda: [RewardConfig()])
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    update: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    log_every: int = 1
    log_rollouts: bool = True
    """Append every step's prompts, seeds and rewards to rollouts.jsonl."""
    threads: int | None = None
    """torch CPU threads per process (None: torch's default). On a busy shared CPU, 1 thread per process
    avoids OpenMP oversubscription, which can slow small matmuls by 10x."""

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ValueError("rewards must list at least one reward term")
        u, B = self.update, self.rollout.batch_size
        mb = u.minibatch_size or B
        if B % mb or mb % min(u.micro_batch_size, mb):
            raise ValueError(f"rollout.batch_size ({B}) must be a multiple of update.minibatch_size ({mb}), "
                             f"which must be a multiple of update.micro_batch_size ({u.micro_batch_size})")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")


RESUME_MAY_DIFFER = ("checkpoint_every", "keep_checkpoints", "log_every", "update.max_steps",
                     "update.time_budget_s", "eval.every", "threads")


# ---------------------------------------------------------------------------------------------- state
class Progress:
    """Steps done and samples dropped so far; checkpointed with the accelerate state."""

    def __init__(self) -> None:
        self.step = 0
        self.dropped = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.dropped = int(state["step"]), int(state["dropped"])


@dataclasses.dataclass
class RLState:
    cfg: RLConfig
    accelerator: Accelerator
    model: Any                 # the trained policy (prepared by accelerate)
    reference: Any | None      # frozen reference (full mode with beta > 0), else None
    optimizer: Any
    vocab: Vocabulary
    text_tokenizer: Any
    image_tokenizer: Any       # SelftokTokenizer with a renderer
    reward: Reward
    eval_reward: Reward
    prompts: PromptSets
    progress: Progress
    run_dir: Path


class Rollout(NamedTuple):
    prompts: list[dict[str, Any]]   # B prompt items (groups of G consecutive)
    seeds: list[int]                # B sampling seeds
    token_ids: Tensor               # (B, K) sampled visual ids, AR order
    logprobs: Tensor                # (B, K) fp32 sampler log-probs under the policy
    images: list[Image.Image]       # B rendered images
    rewards: Tensor                 # (B,) fp32, NaN/inf = unscorable
    details: list[dict[str, Any]]   # B reward details


# ---------------------------------------------------------------------------------------------- setup
def load_policy(cfg: PolicyConfig, device: torch.device) -> Any:
    """The VLM folder and its Selftok tokenizer (`vlm.pipeline.load_pipeline`, which refuses mismatched
    pairs); the tokenizer must have a renderer, the model is fp32 (mixed precision is autocast's job)."""
    if not cfg.vlm_path or not cfg.tokenizer_path:
        raise ConfigError("policy.vlm_path and policy.tokenizer_path must point at a VLM folder (vlm.train's "
                          "final/) and the Selftok tokenizer (with a renderer) it was trained on")
    # safetensors refuses "cpu:0", which is what accelerate names the CPU device of a multi-process run
    where = "cpu" if device.type == "cpu" else str(device)
    pipe = load_pipeline(cfg.vlm_path, cfg.tokenizer_path, device=where, vae_path=cfg.vae_path,
                         attn_implementation=cfg.attn_implementation)
    if pipe.image_tokenizer.renderer is None:
        raise ConfigError(f"{cfg.tokenizer_path}: this tokenizer has no renderer (its config sets renderer: null)")
    pipe.model.float()
    pipe.image_tokenizer.requires_grad_(False)
    return pipe


def check_prompts(prompts: PromptSets, reward: Reward, eval_reward: Reward) -> None:
    """Fail before training, listing every prompt a reward or the evaluator cannot judge."""
    reward.check_prompts(prompts.train)
    eval_reward.check_prompts(prompts.heldout)


def setup(cfg: RLConfig) -> RLState:
    run_dir = Path(cfg.output_dir)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    acc = make_accelerator(run_dir, cfg.update.mixed_precision)
    setup_logging(acc.is_main_process)
    prompts = build_prompt_sets(cfg.prompts, cfg.update.seed)
    reward = build_reward(cfg.rewards, acc.device)
    eval_reward = ShapesReward(partial_credit=False) if cfg.eval.metric == "program" else reward
    check_prompts(prompts, reward, eval_reward)
    if acc.is_main_process:
        runs.pin_run_config(run_dir, to_dict(cfg), ignore=RESUME_MAY_DIFFER)
    acc.wait_for_everyone()
    set_seed(cfg.update.seed)
    pipe = load_policy(cfg.policy, acc.device)
    model, vocab = pipe.model, pipe.vocab
    reference = None
    if cfg.update.beta > 0 and cfg.policy.mode == "full":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.policy.mode == "lora":
        model = apply_training_mode(model, ModelConfig(mode="lora", lora=cfg.policy.lora), vocab)
    model.config.use_cache = False
    u = cfg.update
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=u.lr, betas=u.betas, weight_decay=u.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    progress = Progress()
    acc.register_for_checkpointing(progress)
    ckpt = runs.latest_checkpoint(run_dir)
    if ckpt is not None:
        acc.load_state(str(ckpt))
        log.info("resumed from %s (step %d)", ckpt, progress.step)
    acc.init_trackers("rl")
    log.info("%d training prompts, %d held-out prompts; reward %s", len(prompts.train), len(prompts.heldout),
             reward.name)
    return RLState(cfg, acc, model, reference, optimizer, vocab, pipe.text_tokenizer, pipe.image_tokenizer, reward,
                   eval_reward, prompts, progress, run_dir)


# ---------------------------------------------------------------------------------------------- rollout
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
    everyone = schedule_prompts(state.prompts.train, step, P * acc.num_processes, cfg.update.seed,
                                cfg.prompts.balance)
    mine = everyone[acc.process_index * P:(acc.process_index + 1) * P]
    prompts = [p for p in mine for _ in range(G)]
    seeds = rollout_seeds(cfg.update.seed, step, acc.process_index * P * G, P * G)
    t0 = time.perf_counter()
    token_ids, logprobs = sample_images(state, [p["prompt"] for p in prompts], seeds)
    t1 = time.perf_counter()
    images = render(state, token_ids)
    t2 = time.perf_counter()
    out = state.reward(images, prompts)
    t3 = time.perf_counter()
    timings.update(rollout_s=t1 - t0, render_s=t2 - t1, reward_s=t3 - t2)
    return Rollout(prompts, seeds, token_ids, logprobs, images, out.scores.float(), out.details)


# ---------------------------------------------------------------------------------------------- update
class ScoringInputs(NamedTuple):
    prompts: list[list[int]]          # B conditional prompt ids
    uncond: list[list[int]] | None    # B unconditional prompt ids (guided policies)
    allowed: Tensor | None            # (V,) sampleable ids


def scoring_inputs(state: RLState, rollout: Rollout) -> ScoringInputs:
    policy, vocab, tok = state.cfg.rollout.sampling, state.vocab, state.text_tokenizer
    limit = max_prompt_tokens(state.accelerator.unwrap_model(state.model), vocab)
    prompts = t2i_prompt_ids(vocab, tok, [p["prompt"] for p in rollout.prompts], limit)
    uncond = uncond_prompt_ids(vocab, tok, policy, len(prompts), limit) if policy.guided else None
    return ScoringInputs(prompts, uncond, allowed_ids(vocab, policy.vocabulary, state.accelerator.device))


def policy_logprobs_of(state: RLState, model: Any, inputs: ScoringInputs, token_ids: Tensor, rows: Tensor) -> Tensor:
    """(b, K) log-probs of `token_ids[rows]` under the run's sampling policy for `model` (differentiable)."""
    idx = rows.tolist()
    uncond = [inputs.uncond[i] for i in idx] if inputs.uncond is not None else None
    with state.accelerator.autocast():
        return score_tokens(model, [inputs.prompts[i] for i in idx], token_ids[rows], state.cfg.rollout.sampling,
                            inputs.allowed, state.vocab.pad_id, uncond, num_positions=state.vocab.K)


@torch.no_grad()
def frozen_logprobs(state: RLState, inputs: ScoringInputs, token_ids: Tensor, reference: bool) -> Tensor:
    """Log-probs under the current weights (``reference=False``) or the frozen reference, no grad."""
    model = state.accelerator.unwrap_model(state.model)
    model.eval()
    out = []
    for rows in torch.arange(token_ids.shape[0]).split(state.cfg.update.micro_batch_size):
        if not reference:
            out.append(policy_logprobs_of(state, model, inputs, token_ids, rows))
        elif state.reference is not None:
            out.append(policy_logprobs_of(state, state.reference, inputs, token_ids, rows))
        else:  # LoRA: the reference is the base model with its adapters disabled
            with model.disable_adapter():
                out.append(policy_logprobs_of(state, model, inputs, token_ids, rows))
    model.train()
    return torch.cat(out)


def advantages_for(state: RLState, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(advantages (B,) of this process's rollouts, global rewards (W·B,) in process order). Statistics are
    over the global batch (groups are whole on each process, so group stats equal single-process ones)."""
    acc, B = state.accelerator, rewards.shape[0]
    everyone = acc.gather(rewards.to(acc.device)).cpu()
    adv = group_advantages(everyone, state.cfg.rollout.group_size, scale=state.cfg.update.advantage_scale)
    return adv[acc.process_index * B:(acc.process_index + 1) * B], everyone


def update_policy(state: RLState, rollout: Rollout, adv: Tensor, valid_all: Tensor) -> dict[str, float]:
    """`update.epochs` passes of mini-batch optimizer steps over the rollout; returns mean metrics.

    `valid_all` (W, B) marks the valid samples of every process: each process divides its loss by the
    mini-batch's valid count over all processes / W, so DDP's gradient average is the exact global mean.
    Without a KL term, samples with advantage 0 (flat groups, dropped samples) have exactly zero gradient;
    a single process skips their forward and backward passes."""
    cfg, acc = state.cfg.update, state.accelerator
    device, B, K = acc.device, rollout.token_ids.shape[0], state.vocab.K
    mb = cfg.minibatch_size or B
    inputs = scoring_inputs(state, rollout)
    tokens = rollout.token_ids.to(device)
    valid = valid_all[acc.process_index].to(device)
    adv = adv.to(device)
    skip_flat = cfg.skip_zero_advantage and cfg.beta == 0 and acc.num_processes == 1
    old = frozen_logprobs(state, inputs, tokens, reference=False) if cfg.epochs > 1 or mb < B else None
    ref = frozen_logprobs(state, inputs, tokens, reference=True) if cfg.beta > 0 else None
    sums = dict.fromkeys(("loss", "policy_loss", "kl", "ratio", "clip_fraction", "logp_gap", "grad_norm"), 0.0)
    n_tok, n_steps = 0, 0
    state.model.train()
    for _ in range(cfg.epochs):
        for start in range(0, B, mb):
            rows = torch.arange(start, min(start + mb, B), device=device)
            n_valid = float(valid_all[:, start:start + mb].sum()) / acc.num_processes
            if skip_flat:
                rows = rows[(adv[rows] != 0) & valid[rows]]
            chunks = [c for c in rows.split(cfg.micro_batch_size) if c.numel()]  # split() of 0 rows gives one empty chunk
            for i, idx in enumerate(chunks):
                with acc.no_sync(state.model) if i < len(chunks) - 1 else contextlib.nullcontext():
                    logp = policy_logprobs_of(state, state.model, inputs, tokens, idx)
                    out = grpo_loss(logp, old[idx] if old is not None else logp.detach(), adv[idx],
                                    torch.ones_like(logp, dtype=torch.bool), valid[idx],
                                    ref[idx] if ref is not None else None, cfg.beta, cfg.eps_low, cfg.eps_high,
                                    num_sequences=n_valid)
                    acc.backward(out.loss)
                t = idx.numel() * K
                sums["loss"] += float(out.loss.detach())
                sums["policy_loss"] += float(out.policy_loss)
                for k in ("kl", "ratio", "clip_fraction"):
                    sums[k] += float(getattr(out, k)) * t
                if old is None:  # teacher-forced recomputation vs the sampler's own log-probs
                    sums["logp_gap"] += float((logp.detach() - rollout.logprobs[idx.cpu()].to(device)).abs().sum())
                n_tok += t
            sums["grad_norm"] += float(acc.clip_grad_norm_(state.model.parameters(), cfg.max_grad_norm))
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            n_steps += 1
    out = {k: sums[k] / n_steps for k in ("loss", "policy_loss", "grad_norm")}
    out.update({k: sums[k] / n_tok if n_tok else (1.0 if k == "ratio" else 0.0)
                for k in ("kl", "ratio", "clip_fraction")})
    if old is not None:
        out["logp_gap"] = float((old - rollout.logprobs.to(device)).abs().mean())
    else:
        out["logp_gap"] = sums["logp_gap"] / n_tok if n_tok else 0.0
    out["trained_fraction"] = n_tok / (B * K * cfg.epochs)
    return out


def set_lr(state: RLState, step: int) -> float:
    u = state.cfg.update
    lr = u.lr * min(1.0, (step + 1) / u.warmup_steps) if u.warmup_steps > 0 else u.lr
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    return lr


def reward_metrics(prompts: Sequence[dict[str, Any]], rewards: Tensor, details: Sequence[dict[str, Any]],
                   group_size: int) -> dict[str, float]:
    """Reward mean/std overall and per category over finite rewards, accuracy when the reward reports it,
    and the fraction of groups whose rewards are all equal (no learning signal)."""
    ok = torch.isfinite(rewards)
    r = rewards[ok]
    m: dict[str, float] = {"reward_mean": float(r.mean()) if r.numel() else float("nan"),
                           "reward_std": float(r.std(unbiased=False)) if r.numel() else float("nan")}
    tags = [str(p.get("tag", "text")) for p in prompts]
    for tag in sorted(set(tags)):
        sel = torch.tensor([t == tag for t in tags]) & ok
        if sel.any():
            m[f"reward/{tag}/mean"] = float(rewards[sel].mean())
            m[f"reward/{tag}/std"] = float(rewards[sel].std(unbiased=False))
    correct = [d["correct"] for d in details if "correct" in d]
    if correct:
        m["train_accuracy"] = sum(correct) / len(correct)
    groups = rewards.view(-1, group_size)
    m["flat_group_fraction"] = float((groups.max(-1).values - groups.min(-1).values == 0).float().mean())
    return m


def train_step(state: RLState) -> dict[str, float]:
    """One RL step: rollout, render, reward, advantages, update. Returns global metrics."""
    acc, step = state.accelerator, state.progress.step
    timings: dict[str, float] = {}
    lr = set_lr(state, step)
    rollout = collect_rollout(state, step, timings)
    adv, everyone = advantages_for(state, rollout.rewards)
    dropped = int((~torch.isfinite(everyone)).sum())
    if dropped:
        log.warning("step %d: %d sample(s) with a NaN/inf reward dropped from the update", step, dropped)
    t0 = time.perf_counter()
    upd = update_policy(state, rollout, adv, torch.isfinite(everyone).view(acc.num_processes, -1))
    timings["update_s"] = time.perf_counter() - t0
    state.progress.step += 1
    state.progress.dropped += dropped
    all_prompts = gather_object(list(rollout.prompts))
    all_details = gather_object(list(rollout.details))
    metrics = reward_metrics(all_prompts, everyone, all_details, state.cfg.rollout.group_size)
    ent = acc.reduce(entropy_estimate(rollout.logprobs, torch.ones_like(rollout.logprobs, dtype=torch.bool))
                     .to(acc.device), "mean")
    metrics.update(upd, **timings, lr=lr, entropy=float(ent), dropped=dropped, dropped_total=state.progress.dropped)
    metrics = {k: float(acc.reduce(torch.tensor(v, device=acc.device), "mean")) if k in upd or k in timings
               else v for k, v in metrics.items()}
    if state.cfg.log_rollouts:
        seeds = gather_object(list(rollout.seeds))
        if acc.is_main_process:
            rewards = [x if math.isfinite(x) else None for x in everyone.tolist()]
            with (state.run_dir / "rollouts.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "prompts": [p["prompt"] for p in all_prompts], "seeds": seeds,
                                    "rewards": rewards}) + "\n")
    return metrics


# ---------------------------------------------------------------------------------------------- evaluation
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
    values = ((str(e.get("tag", "text")), float(d.get("correct", False)) if metric == "program" else s)
              for e, s, d in zip(entries, scores, details))
    overall, cats, counts = category_means((tag, v) for tag, v in values if math.isfinite(v))
    return {"overall": overall, "per_category": cats, "counts": counts, "n": len(entries)}


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


# ---------------------------------------------------------------------------------------------- run
def save_final(state: RLState) -> Path:
    """The fine-tuned VLM (adapters merged) + text tokenizer + vocab.json in run_dir/final."""
    acc, final = state.accelerator, state.run_dir / "final"
    acc.wait_for_everyone()
    full_state = acc.get_state_dict(state.model)
    if acc.is_main_process:
        model = acc.unwrap_model(state.model)
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model.save_pretrained(str(final / "adapter"), state_dict=full_state)
            export_model(model).save_pretrained(str(final))
        else:
            export_model(model).save_pretrained(str(final), state_dict=full_state)
            model.config.use_cache = False
        state.text_tokenizer.save_pretrained(str(final))
        state.vocab.save(final)
        log.info("saved the fine-tuned VLM to %s", final)
    acc.wait_for_everyone()
    return final


def run(cfg: RLConfig) -> Path:
    state = setup(cfg)
    acc, total = state.accelerator, cfg.update.max_steps
    if cfg.eval.at_start and state.progress.step == 0:
        evaluate(state)
    bar = tqdm(total=total, initial=state.progress.step, disable=not acc.is_main_process, desc="rl")
    rl_seconds = 0.0  # time in RL steps only: evaluations and checkpoints do not count against the budget
    while state.progress.step < total:
        t0 = time.perf_counter()
        metrics = train_step(state)
        rl_seconds += time.perf_counter() - t0
        metrics["rl_seconds"] = rl_seconds
        step = state.progress.step
        runs.check_finite(metrics["loss"], step)
        if acc.is_main_process:
            with (state.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}")
        if step % cfg.log_every == 0:
            acc.log(metrics, step=step)
        over_budget = cfg.update.time_budget_s is not None and rl_seconds >= cfg.update.time_budget_s
        if acc.num_processes > 1:  # every process must stop at the same step
            over_budget = bool(acc.reduce(torch.tensor([float(over_budget)], device=acc.device), "sum").item() > 0)
        done = step == total or over_budget
        if step % cfg.checkpoint_every == 0 or done:
            runs.save_checkpoint(acc, state.run_dir, step, keep=cfg.keep_checkpoints)
        if done or (cfg.eval.every > 0 and step % cfg.eval.every == 0):
            evaluate(state)
        if over_budget:
            log.info("time budget of %.0f s reached after step %d", cfg.update.time_budget_s, step)
            break
    bar.close()
    final = save_final(state)
    acc.end_training()
    runs.finish_distributed()
    return final


def main(argv: list[str] | None = None) -> int:
    """Train per the config (final policy in ``output_dir/final``); returns the exit status."""
    parser = run_parser("python -m rl.train", "GRPO fine-tuning of a VLM over visual tokens (Selftok-Zero).")
    cfg, _ = parse_run_config(RLConfig, parser, argv)
    run(cfg)
    return 0


cli = entry_point(main)
if __name__ == "__main__":
    cli()
