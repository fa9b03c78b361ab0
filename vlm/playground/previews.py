"""Coarse-to-fine previews of a partly sampled image: complete the prefix greedily, render it in one step.

Selftok's decoders always see all K tokens (the renderer was trained on full sequences), so the first n
sampled tokens cannot be decoded on their own. A preview after n tokens is therefore: the n sampled tokens,
then positions n..K-1 filled with the policy's most likely id at each step (argmax of the same guided,
visual-only distribution the sampler draws from, same prompt and unconditional branch), rendered with the
one-step renderer. As n grows the preview converges to the final image; at n = K it is the final image.

`PreviewTap` wraps the VLM while `vlm.generate.generate_image_tokens` samples: it passes every call through
unchanged and, every `every` sampled tokens, hands the prefix to a callback. The completion runs its own
forwards (no shared KV cache) and draws no random numbers, so previews cannot change the sampled tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vlm.sampler import left_pad, position_ids
from vlm.sampling import SamplingPolicy, policy_logprobs
from vlm.vocab import Vocabulary


@torch.no_grad()
def complete_greedily(model: torch.nn.Module, vocab: Vocabulary, prompts: list[list[int]],
                      uncond_prompts: list[list[int]], prefix: Tensor, policy: SamplingPolicy) -> Tensor:
    """Extend the (B, n) visual ids `prefix` to (B, K): position t >= n gets the argmax of `policy`'s
    distribution at t (guidance and its schedule included), restricted to the visual ids."""
    B, n = prefix.shape
    K, device = vocab.K, prefix.device
    if n >= K:
        return prefix[:, :K]
    reps = 2 if policy.guided else 1
    rows = list(prompts) + (list(uncond_prompts) if policy.guided else [])
    ids, attn = left_pad(rows, vocab.pad_id, device)
    ids = torch.cat([ids, prefix.repeat(reps, 1)], dim=1)
    attn = torch.cat([attn, attn.new_ones(reps * B, n)], dim=1)
    pos = position_ids(attn)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    next_pos, allowed, filled = pos[:, -1:] + 1, vocab.visual_mask(device), [prefix]
    for t in range(n, K):
        logits = out.logits[:, -1]
        logp = policy_logprobs(logits[:B], logits[B:] if policy.guided else None, policy, t, K, allowed)
        filled.append(logp.argmax(dim=-1, keepdim=True))
        if t == K - 1:
            break
        attn = torch.cat([attn, attn.new_ones(reps * B, 1)], dim=1)
        out = model(input_ids=filled[-1].repeat(reps, 1), attention_mask=attn, position_ids=next_pos,
                    cache=out.cache, use_cache=True)
        next_pos = next_pos + 1
    return torch.cat(filled, dim=1)


class PreviewTap(torch.nn.Module):
    """The VLM, unchanged, that reports the sampler's progress.

    `vlm.generate.sample_tokens` feeds each sampled token back through the model with its KV cache
    (``cache=``); those calls' first B rows (B = cond rows; the uncond rows repeat them) are the tokens
    sampled so far. After every `every`-th one, ``on_prefix(prefix)`` gets the (B, n) ids sampled so far."""

    def __init__(self, model: torch.nn.Module, guided: bool, every: int, on_prefix: Callable[[Tensor], None]):
        super().__init__()
        self.model, self.reps, self.every, self.on_prefix = model, 2 if guided else 1, every, on_prefix
        self.sampled: list[Tensor] = []

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Any:
        out = self.model(input_ids=input_ids, **kwargs)
        if kwargs.get("cache") is None:  # a prompt batch: sampling (re)starts
            self.sampled = []
            return out
        self.sampled.append(input_ids[:input_ids.shape[0] // self.reps])
        if self.every > 0 and len(self.sampled) % self.every == 0:
            self.on_prefix(torch.cat(self.sampled, dim=1))
        return out
