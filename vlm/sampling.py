"""The sampling policy: how the VLM turns next-token logits into a distribution over token ids.

One `SamplingPolicy` describes classifier-free guidance (scale, optional schedule over positions, and the
unconditional prompt: the `<uncond>` token or a negative prompt), temperature, top-k, top-p and which part of
the vocabulary may be sampled. `policy_logprobs` is the single pure function that applies it; the sampler
(`vlm.generate`) draws from its output and RL computes log-probabilities with the same function, so training
is on-policy with respect to exactly what was sampled.

Order of operations (all in fp32): CFG mix of the conditional and unconditional logits
(``uncond + s * (cond - uncond)``, with s the scale at the token's position) → divide by the temperature →
mask ids outside the allowed vocabulary → keep the top-k → keep the top-p nucleus → log-softmax. Ids outside
the support get log-probability ``-inf``.

Shapes: logits are (..., V); positions broadcast against the leading dims; ``allowed`` is a (V,) bool mask.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor

VocabularyChoice = Literal["visual", "text", "all"]


@dataclasses.dataclass
class SamplingPolicy:
    """How tokens are sampled. Invalid settings raise ``ValueError`` naming the setting."""

    cfg_scale: float = 3.0
    """classifier-free guidance scale (at the first sampled position when a schedule is set); 1 = no guidance
    (the unconditional rows are not computed), 0 = unconditional only; must be >= 0."""
    cfg_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """how the guidance scale moves over the K image positions: constant, or a linear / half-cosine
    interpolation from `cfg_scale` at the first (coarsest) token to `cfg_scale_end` at the last."""
    cfg_scale_end: float | None = None
    """guidance scale at the last position for the linear / cosine schedules (required by them)."""
    negative_prompt: str | None = None
    """text of the unconditional branch; None uses the `<uncond>` token (``<bos> <uncond> <boi>``), the
    prompt the model was trained with for guidance."""
    temperature: float = 1.0
    """softmax temperature, > 0."""
    top_k: int = 0
    """keep only the k most likely ids (ties at the k-th value are kept); 0 = off; 1 = greedy."""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of most likely ids whose mass reaches top_p; in (0, 1]."""
    vocabulary: VocabularyChoice = "visual"
    """which ids may be sampled: "visual" (the image span), "text" (captions and answers), or "all"."""

    def __post_init__(self) -> None:
        def finite(name: str, value: float) -> None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

        finite("cfg_scale", self.cfg_scale)
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.cfg_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"cfg_schedule must be constant, linear or cosine, got {self.cfg_schedule!r}")
        if self.cfg_scale_end is not None:
            finite("cfg_scale_end", self.cfg_scale_end)
            if self.cfg_scale_end < 0:
                raise ValueError(f"cfg_scale_end must be >= 0, got {self.cfg_scale_end}")
        if self.cfg_schedule != "constant" and self.cfg_scale_end is None:
            raise ValueError(f"cfg_scale_end is required by cfg_schedule={self.cfg_schedule!r}")
        finite("temperature", self.temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy decoding), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        finite("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.vocabulary not in ("visual", "text", "all"):
            raise ValueError(f"vocabulary must be visual, text or all, got {self.vocabulary!r}")

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch is needed (some position has a scale other than 1)."""
        ends = [self.cfg_scale] + ([self.cfg_scale_end] if self.cfg_schedule != "constant" else [])
        return any(s != 1.0 for s in ends)

    @classmethod
    def greedy_text(cls) -> SamplingPolicy:
        """Deterministic captioning / answering: the most likely text id at every step."""
        return cls(cfg_scale=1.0, top_k=1, vocabulary="text")


def cfg_scales(policy: SamplingPolicy, positions: Tensor, num_positions: int) -> Tensor:
    """Guidance scale at each position.

    Args: positions: integer tensor of 0-based positions in the sampled span; num_positions: span length
    (K for images). Returns: float32 tensor shaped like `positions`."""
    positions = positions.to(torch.float32)
    if policy.cfg_schedule == "constant":
        return torch.full_like(positions, policy.cfg_scale)
    frac = (positions / max(num_positions - 1, 1)).clamp(0.0, 1.0)
    if policy.cfg_schedule == "cosine":
        frac = 0.5 - 0.5 * torch.cos(math.pi * frac)
    return policy.cfg_scale + (policy.cfg_scale_end - policy.cfg_scale) * frac


def cfg_mix(cond: Tensor, uncond: Tensor, scale: Tensor | float) -> Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; `scale` broadcasts over (..., 1)."""
    if isinstance(scale, Tensor):
        scale = scale.unsqueeze(-1)
    return uncond + scale * (cond - uncond)


def mask_logits(logits: Tensor, allowed: Tensor) -> Tensor:
    """Set the logits of ids outside the (V,) bool mask `allowed` to -inf."""
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (and any tied with the k-th); k = 0 keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely ids whose probability mass reaches p (always the top id)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely ids
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def policy_logprobs(cond_logits: Tensor, uncond_logits: Tensor | None, policy: SamplingPolicy,
                    positions: Tensor | int, num_positions: int, allowed: Tensor | None) -> Tensor:
    """The final sampling log-distribution of `policy` (used by the sampler and by RL).

    Args:
        cond_logits: (..., V) next-token logits of the conditional rows.
        uncond_logits: (..., V) logits of the unconditional rows; may be None only if not `policy.guided`.
        positions: 0-based position(s) of the sampled token in its span, broadcastable to the leading dims.
        num_positions: length of the span (K for images), used by the CFG schedule.
        allowed: (V,) bool mask of ids that may be sampled, or None for the whole vocabulary.
    Returns: (..., V) float32 log-probabilities, -inf outside the support."""
    logits = cond_logits.float()
    if policy.guided:
        if uncond_logits is None:
            raise ValueError("the policy uses classifier-free guidance but no unconditional logits were given")
        pos = torch.as_tensor(positions, device=logits.device).expand(logits.shape[:-1])
        scale = cfg_scales(policy, pos, num_positions)
        # positions where the schedule gives exactly 1 keep the conditional logits bit for bit
        mixed = cfg_mix(logits, uncond_logits.float(), scale)
        logits = torch.where((scale == 1.0).unsqueeze(-1), logits, mixed)
    logits = logits / policy.temperature
    if allowed is not None:
        logits = mask_logits(logits, allowed)
    logits = top_k_filter(logits, policy.top_k)
    logits = top_p_filter(logits, policy.top_p)
    return logits.log_softmax(dim=-1)


def sample_from_logprobs(logp: Tensor, generators: list[torch.Generator]) -> Tensor:
    """Draw one id per row of (B, V) `logp`, row b using only `generators[b]` (Gumbel-max trick).

    Because each row's noise comes from its own generator, a row's sample does not depend on the other
    rows of the batch. Returns: (B,) int64 ids."""
    if len(generators) != logp.shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} generators for {logp.shape[0]} rows")
    gumbel = torch.stack([
        -torch.log(-torch.log(torch.rand(logp.shape[-1], generator=g, device=g.device,
                                         dtype=torch.float64).clamp_min(1e-300)))
        for g in generators]).to(logp.device)
    return (logp.double() + gumbel).argmax(dim=-1)


def gather_logprobs(logp: Tensor, token_ids: Tensor) -> Tensor:
    """Log-probability of `token_ids` (...,) under (..., V) `logp` (fp32)."""
    return logp.float().gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
