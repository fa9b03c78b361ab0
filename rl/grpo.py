"""GRPO core math: group-relative advantages, the clipped importance-ratio loss, the k3 KL estimator.

Pure functions on tensors, each unit-tested (tests/test_grpo.py). Shapes: N rollouts in a batch, laid out
as N / G consecutive groups of G samples of the same prompt; T sampled tokens per rollout (K for an image);
``mask`` (N, T) is True on tokens that count in the loss. Log-probabilities are fp32 and must come from the
exact sampling policy (see `rl.train` and `vlm.sampling.policy_logprobs`).

Rewards that are NaN or infinite mark their sample invalid: it is excluded from its group's statistics,
gets advantage 0 and contributes nothing to the loss (`valid` below); callers count the drops.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]


class PolicyLossOutput(NamedTuple):
    loss: Tensor           # () scalar: sum over valid sequences of the per-sequence loss / `num_sequences`
    policy_loss: Tensor    # () the clipped-surrogate part, same normalisation (no grad needed)
    kl: Tensor             # () mean k3 KL per valid token (0 when no reference is given)
    ratio: Tensor          # () mean importance ratio over valid tokens
    clip_fraction: Tensor  # () fraction of valid tokens whose clipped term is the active one


def valid_rewards(rewards: Tensor) -> Tensor:
    """(N,) bool: True where the reward is finite (NaN / ±inf samples are dropped from the update)."""
    return torch.isfinite(rewards)


def group_advantages(rewards: Tensor, group_size: int, valid: Tensor | None = None,
                     scale: AdvantageScale = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages ``(r_i - mean_g) / (std_g + eps)``.

    Args:
        rewards: (N,) rewards, N = number of groups * `group_size`, groups consecutive.
        valid: (N,) bool, False for samples to drop (default: the finite rewards). Dropped samples are left
            out of every statistic and get advantage 0; a group with fewer than 2 valid samples gets 0.
        scale: "group" divides by the group's std, "batch" by the std of all valid rewards, "none" keeps
            the centred rewards (Dr. GRPO). Stds are population stds (divide by n, not n - 1), so a
            group of two rewards {0, 1} gets advantages {-1, +1} up to eps.
    Returns: (N,) fp32 advantages; a group of identical rewards gives exactly 0 (never NaN).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N divisible by group_size={group_size}, got {tuple(rewards.shape)}")
    valid = valid_rewards(rewards) if valid is None else valid & valid_rewards(rewards)
    r = torch.where(valid, rewards.float(), 0.0).view(-1, group_size)      # (N/G, G)
    w = valid.view(-1, group_size).float()
    n = w.sum(-1, keepdim=True)                                             # (N/G, 1)
    mean = r.sum(-1, keepdim=True) / n.clamp_min(1)
    centred = (r - mean) * w
    if scale == "group":
        std = (centred.square().sum(-1, keepdim=True) / n.clamp_min(1)).sqrt()
        adv = torch.where(std > 0, centred / (std + eps), 0.0)  # identical rewards: 0, not 0/0
    elif scale == "batch":
        flat = rewards.float()[valid]
        std = flat.std(unbiased=False) if flat.numel() > 1 else flat.new_zeros(())
        adv = torch.where(std > 0, centred / (std + eps), 0.0)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    adv = torch.where(n >= 2, adv, 0.0)
    return adv.reshape(-1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference) for tokens sampled from the policy:
    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased, = 0 where the two agree). Same shape as inputs."""
    d = ref_logp.float() - logp.float()
    return torch.exp(d) - d - 1.0


def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float,
                      eps_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO/GRPO clipped objective per token, as a loss to minimise.

    Args: logp, old_logp: (N, T); adv: (N,) or (N, T). Returns: loss (N, T) ``-min(r A, clip(r, 1-eps_low,
    1+eps_high) A)``, ratio r (N, T), clipped (N, T) bool where the clipped term is the smaller one (its
    gradient is 0)."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    ratio = torch.exp(logp.float() - old_logp.float())
    unclipped = ratio * adv
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped = clipped_ratio * adv
    loss = -torch.minimum(unclipped, clipped)
    is_clipped = clipped < unclipped
    return loss, ratio, is_clipped


def grpo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, valid: Tensor,
              ref_logp: Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2,
              num_sequences: float | None = None) -> PolicyLossOutput:
    """The GRPO loss of one (micro-)batch.

    Per token: clipped surrogate + beta * k3 KL; per sequence: mean over its masked tokens; the batch loss
    sums the valid sequences and divides by `num_sequences` (default: the valid ones here). Passing the
    valid-sequence count of a whole mini-batch makes gradients accumulated over its micro-batches equal
    to the gradient of the mini-batch mean.

    Args: logp (N, T) differentiable log-probs under the current policy; old_logp (N, T) at rollout time
    (detached); adv (N,); mask (N, T) bool; valid (N,) bool; ref_logp (N, T) of the frozen reference or None.
    """
    surrogate, ratio, is_clipped = clipped_surrogate(logp, old_logp, adv.detach(), eps_low, eps_high)
    tok = mask & valid.unsqueeze(-1)
    tokf = tok.float()
    per_token = surrogate
    kl = torch.zeros_like(surrogate)
    if ref_logp is not None and beta != 0.0:
        kl = k3_kl(logp, ref_logp.detach())
        per_token = surrogate + beta * kl
    denom_tok = tokf.sum(-1).clamp_min(1.0)
    per_seq = (per_token * tokf).sum(-1) / denom_tok                        # (N,)
    per_seq_pg = (surrogate * tokf).sum(-1) / denom_tok
    n_seq = float(num_sequences) if num_sequences is not None else float(valid.sum())
    n_seq = max(n_seq, 1.0)
    # torch.where keeps NaN/inf from dropped rows out of the sum (0 * inf would be NaN)
    loss = torch.where(valid, per_seq, 0.0).sum() / n_seq
    n_tok = tokf.sum().clamp_min(1.0)
    with torch.no_grad():
        return PolicyLossOutput(
            loss=loss,
            policy_loss=torch.where(valid, per_seq_pg, 0.0).sum() / n_seq,
            kl=(kl * tokf).sum() / n_tok,
            ratio=(ratio * tokf).sum() / n_tok,
            clip_fraction=(is_clipped.float() * tokf).sum() / n_tok,
        )


def entropy_estimate(sampled_logp: Tensor, mask: Tensor) -> Tensor:
    """Monte-Carlo estimate of the policy's mean per-token entropy from the log-probs of its own samples:
    ``E_x[-log p(x)] = H(p)``, so the mean of -logp over sampled tokens is unbiased. () fp32."""
    m = mask.float()
    return -(sampled_logp.float() * m).sum() / m.sum().clamp_min(1.0)
