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
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate.utils import gather_object, set_seed
from torch import Tensor
from tqdm.auto import tqdm

from rl.config import RESUME_MAY_DIFFER, PolicyConfig, RLConfig
from rl.evaluation import evaluate
from rl.grpo import entropy_estimate, group_advantages, grpo_loss
from rl.prompts import CategoryCurriculum, PromptSets, build_prompt_sets
from rl.rewards import Reward, ShapesReward, build_reward
from rl.rollout import Rollout, collect_rollout
from rl.state import RLState
from selftok.runtime import runs
from selftok.runtime.cli import entry_point, parse_run_config, run_parser, setup_logging
from selftok.runtime.config import ConfigError, to_dict
from selftok.runtime.launch import make_accelerator, scheduled_lr
from vlm.model import ModelConfig, apply_training_mode, export_model
from vlm.pipeline import load_pipeline
from vlm.sampler import (
    allowed_ids,
    max_prompt_tokens,
    score_tokens,
    t2i_prompt_ids,
    uncond_prompt_ids,
)

log = logging.getLogger(__name__)


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
    run_dir = Path(cfg.run.out_dir)
    if cfg.run.num_threads is not None:
        torch.set_num_threads(cfg.run.num_threads)
    acc = make_accelerator(run_dir, cfg.run.mixed_precision)
    setup_logging(acc.is_main_process)
    prompts = build_prompt_sets(cfg.prompts, cfg.run.seed)
    reward = build_reward(cfg.rewards, acc.device)
    eval_reward = ShapesReward(partial_credit=False) if cfg.eval.metric == "program" else reward
    check_prompts(prompts, reward, eval_reward)
    if acc.is_main_process:
        runs.pin_run_config(run_dir, to_dict(cfg), ignore=RESUME_MAY_DIFFER)
    acc.wait_for_everyone()
    set_seed(cfg.run.seed)
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
    progress = runs.Progress()
    acc.register_for_checkpointing(progress)
    curriculum = None
    if cfg.prompts.balance == "adaptive":
        curriculum = CategoryCurriculum(prompts.train, cfg.prompts.adaptive_floor, cfg.prompts.adaptive_decay)
        acc.register_for_checkpointing(curriculum)
    ckpt = runs.latest_checkpoint(run_dir)
    if ckpt is not None:
        acc.load_state(str(ckpt))
        log.info("resumed from %s (step %d)", ckpt, progress.step)
    acc.init_trackers("rl")
    log.info("%d training prompts, %d held-out prompts; reward %s", len(prompts.train), len(prompts.heldout),
             reward.name)
    return RLState(cfg, acc, model, reference, optimizer, vocab, pipe.text_tokenizer, pipe.image_tokenizer, reward,
                   eval_reward, prompts, progress, run_dir, curriculum)


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
    lr = u.lr * scheduled_lr(1.0, step, u.warmup_steps, 0)  # linear warm-up, then constant
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
    if state.curriculum is not None:
        metrics.update({f"share/{c}": v for c, v in state.curriculum.shares().items()})  # the shares this step used
        state.curriculum.update(all_prompts, everyone.tolist(), state.cfg.rollout.group_size)
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
        if step % cfg.run.log_every == 0:
            acc.log(metrics, step=step)
        over_budget = cfg.update.time_budget_s is not None and rl_seconds >= cfg.update.time_budget_s
        if acc.num_processes > 1:  # every process must stop at the same step
            over_budget = bool(acc.reduce(torch.tensor([float(over_budget)], device=acc.device), "sum").item() > 0)
        done = step == total or over_budget
        if step % cfg.run.checkpoint_every == 0 or done:
            runs.save_checkpoint(acc, state.run_dir, step, keep=cfg.run.keep_checkpoints)
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
    """Train per the config (final policy in ``run.out_dir/final``); returns the exit status."""
    parser = run_parser("python -m rl.train", "GRPO fine-tuning of a VLM over visual tokens (Selftok-Zero).")
    cfg, _ = parse_run_config(RLConfig, parser, argv)
    run(cfg)
    return 0


cli = entry_point(main)
if __name__ == "__main__":
    cli()
