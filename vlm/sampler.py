"""Sampling from the VLM: text → image and image → text, batched, KV-cached, classifier-free guided.

The core loop (`sample_tokens`) works with any Hugging Face causal LM. Conditional and unconditional rows
run as ONE batch (rows ``[cond_0 … cond_{B-1}, uncond_0 … uncond_{B-1}]``) through the model's KV cache, so
guidance costs one forward of 2B rows per token instead of a second pass. Prompts are left-padded and get
explicit position ids, so padding does not change a row's logits. Every row draws its noise from its own
seeded generator: an image depends on its seed, not on what else is in the batch.

`score_tokens` recomputes, in one teacher-forced forward, the log-probabilities of given tokens under the
same policy (the function RL uses); `sample_tokens` records the same quantities while sampling.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlm.sampling import SamplingPolicy, gather_logprobs, policy_logprobs, sample_from_logprobs
from vlm.vocab import Vocabulary, ar_to_encoder_order, encode_caption

log = logging.getLogger(__name__)


class SampleOutput(NamedTuple):
    token_ids: Tensor  # (B, T) sampled ids; after a row's stop id, `pad_id`
    logprobs: Tensor   # (B, T) fp32 log-probability of each sampled id under the policy; 0 where ~mask
    mask: Tensor       # (B, T) bool, True for sampled tokens (a row's stop id included)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-pad token id lists. Returns: ids (B, L) int64, attention_mask (B, L) int64 (1 = real token)."""
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt row needs at least one token (its <bos>)")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) positions counting real tokens only, so left padding does not shift a row's positions."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def make_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per row."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _rows(prompts: list[list[int]], uncond_prompts: list[list[int]] | None, policy: SamplingPolicy) -> list:
    if not policy.guided:
        return list(prompts)
    if uncond_prompts is None or len(uncond_prompts) != len(prompts):
        raise ValueError("a guided policy needs one unconditional prompt per conditional prompt")
    return list(prompts) + list(uncond_prompts)


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, prompts: list[list[int]], policy: SamplingPolicy,
                  allowed: Tensor | None, max_new_tokens: int, seeds: list[int], pad_id: int,
                  uncond_prompts: list[list[int]] | None = None, stop_id: int | None = None,
                  num_positions: int | None = None, progress: bool = False) -> SampleOutput:
    """Sample up to `max_new_tokens` ids after each prompt with a KV cache.

    Args:
        model: HF causal LM (``model(input_ids, attention_mask, position_ids, cache, use_cache,
            logits_to_keep)``); run under the caller's autocast.
        prompts: B token-id lists (conditional rows).
        allowed: (V,) bool mask of sampleable ids (see `vlm.sampling.policy_logprobs`).
        seeds: one seed per row.
        uncond_prompts: B token-id lists for the unconditional branch (required when `policy.guided`).
        stop_id: a row stops after sampling this id (text); None samples exactly `max_new_tokens` (images).
        num_positions: span length for the CFG schedule (defaults to `max_new_tokens`).
    """
    if not prompts:
        raise ValueError("no prompts to sample from")
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: {len(seeds)} seeds for {len(prompts)} prompts")
    device = next(model.parameters()).device
    B, T = len(prompts), max_new_tokens
    ids, attn = left_pad(_rows(prompts, uncond_prompts, policy), pad_id, device)
    pos = position_ids(attn)
    generators = make_generators(seeds, device)
    out_ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, T), dtype=torch.float32, device=device)
    out_mask = torch.zeros((B, T), dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    next_pos = pos[:, -1:] + 1
    for t in tqdm(range(T), desc="sampling", disable=not progress, leave=False):
        logits = out.logits[:, -1]
        uncond = logits[B:] if policy.guided else None
        logp = policy_logprobs(logits[:B], uncond, policy, t, num_positions or T, allowed)
        tok = sample_from_logprobs(logp, generators)
        live = ~finished
        out_ids[:, t] = torch.where(live, tok, pad_id)
        out_logp[:, t] = torch.where(live, gather_logprobs(logp, tok), 0.0)
        out_mask[:, t] = live
        if stop_id is not None:
            finished |= tok == stop_id
            if bool(finished.all()):
                break
        if t == T - 1:
            break
        step = out_ids[:, t:t + 1].repeat(2 if policy.guided else 1, 1)
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        out = model(input_ids=step, attention_mask=attn, position_ids=next_pos, cache=out.cache,
                    use_cache=True)
        next_pos = next_pos + 1
    return SampleOutput(out_ids, out_logp, out_mask)


def score_tokens(model: torch.nn.Module, prompts: list[list[int]], token_ids: Tensor, policy: SamplingPolicy,
                 allowed: Tensor | None, pad_id: int, uncond_prompts: list[list[int]] | None = None,
                 num_positions: int | None = None) -> Tensor:
    """Teacher-forced log-probabilities of `token_ids` (B, T) after `prompts` under `policy`.

    One forward over the cond (and uncond) rows; differentiable (RL calls it under autograd).
    Returns: (B, T) fp32 log-probs; entries after a row's stop id are meaningless (mask them)."""
    B, T = token_ids.shape
    device = token_ids.device
    rows = _rows(prompts, uncond_prompts, policy)
    ids, attn = left_pad(rows, pad_id, device)
    tokens = token_ids.repeat(2 if policy.guided else 1, 1)
    ids = torch.cat([ids, tokens], dim=1)
    attn = torch.cat([attn, attn.new_ones(tokens.shape)], dim=1)
    # logits at the last prompt token and at tokens 0..T-2 predict tokens 0..T-1
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn),
                   use_cache=False, logits_to_keep=T + 1).logits[:, :-1]
    uncond = logits[B:] if policy.guided else None
    positions = torch.arange(T, device=device)
    logp = policy_logprobs(logits[:B], uncond, policy, positions, num_positions or T, allowed)
    return gather_logprobs(logp, token_ids)


# ---- the VLM's vocabulary: prompts, masks, images and captions ----------------------------------------


def allowed_ids(vocab: Vocabulary, vocabulary: str, device: torch.device | str | None = None) -> Tensor | None:
    """The (V,) bool mask of `SamplingPolicy.vocabulary` ("visual", "text" or "all" → None)."""
    if vocabulary == "visual":
        return vocab.visual_mask(device)
    if vocabulary == "text":
        return vocab.text_mask(device)
    return None


def max_prompt_tokens(model: torch.nn.Module, vocab: Vocabulary) -> int:
    """Text ids a t2i prompt may hold: the context minus <bos>, <boi>, K visual ids, <eoi> and <eos>."""
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    room = context - vocab.K - 4
    if room < 0:
        raise ValueError(f"the model's context ({context}) cannot hold K={vocab.K} visual tokens")
    return room


def t2i_prompt_ids(vocab: Vocabulary, text_tokenizer: Any, captions: list[str], max_tokens: int) -> list[list[int]]:
    """``<bos> caption <boi>`` per caption; an empty caption is the unconditional prompt; captions longer
    than `max_tokens` text ids are truncated with a warning."""
    rows = []
    for caption in captions:
        if not caption.strip():
            rows.append(vocab.uncond_prompt())
            continue
        ids = encode_caption(text_tokenizer, caption)
        if len(ids) > max_tokens:
            log.warning("prompt of %d tokens truncated to %d: %r", len(ids), max_tokens, caption[:80])
            ids = ids[:max_tokens]
        rows.append(vocab.t2i_prompt(ids))
    return rows


def uncond_prompt_ids(vocab: Vocabulary, text_tokenizer: Any, policy: SamplingPolicy, n: int,
                      max_tokens: int) -> list[list[int]]:
    """The unconditional branch: ``<bos> <uncond> <boi>``, or the policy's negative prompt."""
    if policy.negative_prompt is None:
        return [vocab.uncond_prompt()] * n
    return t2i_prompt_ids(vocab, text_tokenizer, [policy.negative_prompt], max_tokens) * n


class ImageTokens(NamedTuple):
    token_ids: Tensor  # (N, K + 1) sampled visual ids in AR order, then <eoi> (appended, not sampled)
    logprobs: Tensor   # (N, K) fp32 log-probability of each visual id under the policy
    codes: Tensor      # (N, K) codebook indices in the ENCODER's order (flipped back), ready to decode


def generate_image_tokens(model: torch.nn.Module, vocab: Vocabulary, text_tokenizer: Any, captions: list[str],
                          policy: SamplingPolicy, seeds: list[int], batch_size: int = 16,
                          progress: bool = False) -> ImageTokens:
    """Sample exactly K visual tokens for each caption (one image per caption and seed)."""
    if policy.vocabulary == "text":
        raise ValueError("vocabulary='text' cannot sample an image span; use 'visual' (or 'all')")
    if not captions:
        raise ValueError("no captions to generate images for")
    if len(seeds) != len(captions):
        raise ValueError(f"need one seed per caption: {len(seeds)} seeds for {len(captions)} captions")
    device = next(model.parameters()).device
    limit = max_prompt_tokens(model, vocab)
    allowed = allowed_ids(vocab, policy.vocabulary, device)
    ids, logps = [], []
    for start in tqdm(range(0, len(captions), batch_size), desc="images", disable=not progress):
        chunk = captions[start:start + batch_size]
        out = sample_tokens(model, t2i_prompt_ids(vocab, text_tokenizer, chunk, limit), policy, allowed, vocab.K,
                            seeds[start:start + batch_size], vocab.pad_id,
                            uncond_prompt_ids(vocab, text_tokenizer, policy, len(chunk), limit))
        ids.append(out.token_ids)
        logps.append(out.logprobs)
    token_ids = torch.cat(ids)
    eoi = torch.full((token_ids.shape[0], 1), vocab.eoi_id, dtype=torch.long, device=token_ids.device)
    codes = ar_to_encoder_order(vocab.ids_to_codes(token_ids))
    return ImageTokens(torch.cat([token_ids, eoi], dim=1), torch.cat(logps), codes)


def generate_text(model: torch.nn.Module, vocab: Vocabulary, text_tokenizer: Any, codes: Tensor,
                  policy: SamplingPolicy | None = None, questions: list[str] | None = None,
                  max_new_tokens: int = 32, seeds: list[int] | None = None, batch_size: int = 16,
                  progress: bool = False) -> list[str]:
    """Caption images (or answer `questions` about them) from their (N, K) codes in ENCODER order.

    The prompt is ``<bos> <boi> v_1 … v_K <eoi> [question]``; sampling is restricted to the text ids and
    stops at <eos>. Default policy: greedy (`SamplingPolicy.greedy_text`)."""
    policy = policy or SamplingPolicy.greedy_text()
    if policy.guided:
        raise ValueError("cfg_scale must be 1 for image->text sampling (no unconditional image branch)")
    if policy.vocabulary == "visual":
        raise ValueError("vocabulary='visual' cannot sample text; use 'text' (or 'all')")
    n = codes.shape[0]
    if n == 0:
        raise ValueError("no images to caption")
    if questions is not None and len(questions) != n:
        raise ValueError(f"need one question per image: {len(questions)} questions for {n} images")
    seeds = list(range(n)) if seeds is None else seeds
    device = next(model.parameters()).device
    allowed = allowed_ids(vocab, policy.vocabulary, device)
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    room = context - (vocab.K + 3) - max_new_tokens  # text ids left for a question
    if room < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the model's context ({context}) after "
                         f"the {vocab.K + 3}-token image prompt")
    ar_codes = ar_to_encoder_order(codes)  # the flip is its own inverse: encoder order -> AR order
    prompts = []
    for i, c in enumerate(ar_codes):
        question = encode_caption(text_tokenizer, questions[i]) if questions else []
        if len(question) > room:
            log.warning("question of %d tokens truncated to %d: %r", len(question), room, questions[i][:80])
        prompts.append(vocab.i2t_prompt(c) + question[:room])
    texts = []
    for start in tqdm(range(0, n, batch_size), desc="captions", disable=not progress):
        out = sample_tokens(model, prompts[start:start + batch_size], policy, allowed, max_new_tokens,
                            seeds[start:start + batch_size], vocab.pad_id, stop_id=vocab.eos_id)
        for row, keep in zip(out.token_ids.tolist(), out.mask.tolist()):
            row = [t for t, k in zip(row, keep) if k and t != vocab.eos_id]
            texts.append(text_tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


# ---- decoding through the Selftok tokenizer ------------------------------------------------------------


def image_seed(base_seed: int, prompt: str, index: int) -> int:
    """The seed of image `index` of `prompt`: a stable hash, so an image does not depend on which other
    prompts are generated with it, or in which order."""
    digest = hashlib.sha256(f"{base_seed}\x00{prompt}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def decode_codes(image_tokenizer: Any, codes: Tensor, decoder: str = "renderer", steps: int = 50,
                 seeds: list[int] | None = None, batch_size: int = 16, progress: bool = False) -> Tensor:
    """(N, K) codes in ENCODER order → (N, 3, H, W) images in [0, 1], float32.

    `decoder="renderer"`: one pass of the renderer; `"diffusion"`: the `steps`-step flow decoder, each
    image's starting noise drawn from its own seed (default 0..N-1)."""
    if decoder not in ("renderer", "diffusion"):
        raise ValueError(f"decoder must be renderer or diffusion, got {decoder!r}")
    if decoder == "diffusion" and steps < 1:
        raise ValueError(f"steps must be >= 1 for the diffusion decoder, got {steps}")
    seeds = list(range(codes.shape[0])) if seeds is None else seeds
    cfg, out = image_tokenizer.cfg, []
    for start in tqdm(range(0, codes.shape[0], batch_size), desc="decode", disable=not progress):
        chunk = codes[start:start + batch_size]
        if decoder == "renderer":
            out.append(image_tokenizer.render(chunk).float())
            continue
        shape = (cfg.latent.channels, cfg.latent_size, cfg.latent_size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds[start:start + batch_size]]).to(chunk.device)
        latents = image_tokenizer.decode_latents(chunk, steps, noise=noise)
        out.append(image_tokenizer.latents.decode(latents).float())
    return torch.cat(out).clamp(0, 1)


def generate_images(model: torch.nn.Module, vocab: Vocabulary, text_tokenizer: Any, image_tokenizer: Any,
                    captions: list[str], policy: SamplingPolicy, seeds: list[int], decoder: str = "renderer",
                    steps: int = 50, batch_size: int = 16, progress: bool = False) -> tuple[ImageTokens, Tensor]:
    """Captions → sampled tokens → images (N, 3, H, W) in [0, 1] (codes flipped to encoder order first)."""
    tokens = generate_image_tokens(model, vocab, text_tokenizer, captions, policy, seeds, batch_size, progress)
    images = decode_codes(image_tokenizer, tokens.codes.to(device_of(image_tokenizer)), decoder, steps, seeds,
                          batch_size, progress)
    return tokens, images


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
