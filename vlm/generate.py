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

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftok.cli import entry_point, setup_logging
from selftok.config import to_dict
from selftok.grid import image_grid, pil_to_tensor, to_pil_images
from selftok.shapes.folder import IMAGE_SUFFIXES
from vlm.sampling import SamplingPolicy, gather_logprobs, policy_logprobs, sample_from_logprobs
from vlm.vocab import Vocabulary, VocabularyError, ar_to_encoder_order, encode_caption, tokenizer_fingerprint

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
    images = decode_codes(image_tokenizer, tokens.codes.to(_device_of(image_tokenizer)), decoder, steps, seeds,
                          batch_size, progress)
    return tokens, images


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---- loading a model + tokenizer pair -----------------------------------------------------------------


@dataclasses.dataclass
class Pipeline:
    """A trained VLM folder (model + text tokenizer + vocab.json) and the Selftok tokenizer it was trained on."""
    model: torch.nn.Module
    vocab: Vocabulary
    text_tokenizer: Any
    image_tokenizer: Any
    model_dir: str
    tokenizer_dir: str


def check_pair(vocab: Vocabulary, image_tokenizer: Any, model: torch.nn.Module | None = None,
               text_tokenizer: Any = None) -> None:
    """Refuse a model whose vocabulary record disagrees with the image tokenizer (K, codebook size), with its
    own embedding size, or with its text tokenizer."""
    problems = []
    if vocab.K != image_tokenizer.K:
        problems.append(f"K: model {vocab.K}, tokenizer {image_tokenizer.K}")
    if vocab.codebook_size != image_tokenizer.codebook_size:
        problems.append(f"codebook_size: model {vocab.codebook_size}, tokenizer {image_tokenizer.codebook_size}")
    if model is not None:
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab.visual_end:
            problems.append(f"the model has {rows} output rows but its vocabulary needs {vocab.visual_end}")
    if text_tokenizer is not None and vocab.text_tokenizer_sha256 and \
            tokenizer_fingerprint(text_tokenizer) != vocab.text_tokenizer_sha256:
        problems.append("the text tokenizer's token table differs from the one recorded in vocab.json")
    if problems:
        raise VocabularyError("the model and the image tokenizer do not belong together (" + "; ".join(problems)
                              + "); use the Selftok tokenizer whose token shards the model was trained on")


def load_pipeline(model_dir: str | Path, tokenizer_dir: str | Path, device: str = "cpu",
                  vae_path: str | None = None, attn_implementation: str | None = None) -> Pipeline:
    """Load a `save_pretrained` VLM folder and a Selftok tokenizer folder; refuse mismatched pairs.

    `attn_implementation`: None = transformers' default (sdpa); "eager" decodes faster on CPUs."""
    from selftok.tokenizer import SelftokTokenizer
    vocab = Vocabulary.load(model_dir)
    image_tokenizer = SelftokTokenizer.from_pretrained(tokenizer_dir, vae_path=vae_path, device=device).eval()
    text_tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    check_pair(vocab, image_tokenizer, text_tokenizer=text_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                 attn_implementation=attn_implementation).to(device).eval()
    check_pair(vocab, image_tokenizer, model)
    return Pipeline(model, vocab, text_tokenizer, image_tokenizer, str(model_dir), str(tokenizer_dir))


# ---- command line -------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """A prompts file → rows with a "prompt" key: text (one prompt per non-blank line) or JSONL (objects with
    "prompt", "caption" or "text"; GenEval metadata rows are kept whole, so they can be scored)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() not in (".jsonl", ".json"):
        return [{"prompt": ln.strip()} for ln in lines if ln.strip()]
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("prompt", row.get("caption", row.get("text"))) if isinstance(row, dict) else None
        if not isinstance(text, str):  # bad file content, not a wrong argument type: a ValueError
            raise ValueError(f"{path}:{lineno}: a JSONL row needs a string 'prompt', 'caption' or 'text'")  # noqa: TRY004
        rows.append({**row, "prompt": text})
    return rows


def _add_policy_args(p: argparse.ArgumentParser, text: bool) -> None:
    d = SamplingPolicy.greedy_text() if text else SamplingPolicy()
    g = p.add_argument_group("sampling policy (see docs/generation.md)")
    g.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    g.add_argument("--cfg-schedule", default=d.cfg_schedule, choices=["constant", "linear", "cosine"])
    g.add_argument("--cfg-scale-end", type=float, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--vocabulary", default=d.vocabulary, choices=["visual", "text", "all"])


def _policy(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SamplingPolicy:
    try:
        return SamplingPolicy(cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule,
                              cfg_scale_end=args.cfg_scale_end, negative_prompt=args.negative_prompt,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              vocabulary=args.vocabulary)
    except ValueError as e:
        parser.error(str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vlm.generate", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, help_text in (("t2i", "generate images from prompts"), ("caption", "caption / question images"),
                            ("evaluate", "shapes world: held-out prompt scores and caption accuracy")):
        p = verbs.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help="VLM folder (save_pretrained + tokenizer + vocab.json)")
        p.add_argument("--tokenizer", required=True, help="Selftok tokenizer folder (save_pretrained)")
        p.add_argument("--vae", default=None, help="local SD3 VAE folder, for tokenizers in VAE latent space")
        p.add_argument("--out", required=True, help="output folder (t2i, evaluate) or JSON file (caption)")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast dtype (never fp16)")
        p.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                       help="attention implementation (default: transformers' sdpa; eager is faster on CPU)")
        _add_policy_args(p, text=name == "caption")
        if name in ("t2i", "evaluate"):
            p.add_argument("--n-per-prompt", type=int, default=4 if name == "t2i" else 1)
            p.add_argument("--decoder", default="renderer", choices=["renderer", "diffusion"])
            p.add_argument("--steps", type=int, default=50, help="diffusion decoder steps")
        if name == "t2i":
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--prompt", help="one prompt (may be empty: unconditional)")
            src.add_argument("--prompts", help="prompts file: text (one per line) or JSONL")
        if name in ("caption", "evaluate"):
            p.add_argument("--max-new-tokens", type=int, default=32)
        if name == "caption":
            p.add_argument("--images", required=True, help="folder of images")
            p.add_argument("--question", default=None, help="ask this about every image instead of captioning")
        if name == "evaluate":
            p.add_argument("--n-captions", type=int, default=96, help="held-out scenes to caption (0: skip)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the verb (its record goes to ``--out``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    text = args.verb == "caption"
    policy = _policy(args, parser)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if text and (policy.guided or policy.vocabulary == "visual"):
        parser.error("captions need --cfg-scale 1 and --vocabulary text (or all)")
    if not text and policy.vocabulary == "text":
        parser.error("images need --vocabulary visual (or all)")
    if not text and (args.n_per_prompt < 1 or (args.decoder == "diffusion" and args.steps < 1)):
        parser.error("--n-per-prompt and --steps must be >= 1")
    pipe = load_pipeline(args.model, args.tokenizer, args.device, args.vae, args.attn)
    record = {"model": str(Path(args.model).resolve()), "tokenizer": str(Path(args.tokenizer).resolve()),
              "vocab": pipe.vocab.to_dict(), "tokenizer_config": to_dict(pipe.image_tokenizer.cfg),
              "sampling": to_dict(policy), "seed": args.seed, "batch_size": args.batch_size, "dtype": args.dtype,
              "device": args.device}
    with _autocast(args.device, args.dtype):
        if args.verb == "t2i":
            rows = [{"prompt": args.prompt}] if args.prompt is not None else read_prompts(args.prompts)
            if not rows:
                parser.error(f"{args.prompts}: no prompts")
            record.update(decoder=args.decoder, steps=args.steps if args.decoder == "diffusion" else None)
            write_t2i(pipe, rows, policy, args.n_per_prompt, Path(args.out), record, args.decoder,
                      args.steps, args.batch_size, args.seed)
        elif args.verb == "caption":
            write_captions(pipe, Path(args.images), policy, Path(args.out), record, args.question,
                           args.max_new_tokens, args.batch_size, args.seed)
        else:
            from vlm.evaluation import evaluate_shapes  # imports this module: import here, not at the top
            record.update(decoder=args.decoder, steps=args.steps if args.decoder == "diffusion" else None)
            evaluate_shapes(pipe, policy, Path(args.out), record, args.n_per_prompt, args.n_captions,
                            args.decoder, args.steps, args.batch_size, args.max_new_tokens)
    return 0


def _autocast(device: str, dtype: str):
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def write_t2i(pipe: Pipeline, rows: list[dict[str, Any]], policy: SamplingPolicy, n_per_prompt: int, out: Path,
              record: dict[str, Any], decoder: str = "renderer", steps: int = 50, batch_size: int = 16,
              base_seed: int = 0, seeds: list[int] | None = None) -> dict[str, Any]:
    """Generate `n_per_prompt` images per row → out/images/*.png + metadata.jsonl (an imagefolder that
    `python -m selftok.shapes evaluate --images out/images` scores), out/grid.png, out/generation.json."""
    jobs = [(i, j) for i in range(len(rows)) for j in range(n_per_prompt)]
    captions = [rows[i]["prompt"] for i, _ in jobs]
    seeds = seeds or [image_seed(base_seed, rows[i]["prompt"], j) for i, j in jobs]
    tokens, images = generate_images(pipe.model, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer, captions,
                                     policy, seeds, decoder, steps, batch_size, progress=True)
    pil = to_pil_images(images)
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta, entries = [], []
    for (i, j), im, seed, logp in zip(jobs, pil, seeds, tokens.logprobs.sum(-1).tolist()):
        name = f"{i:05d}_{j:03d}.png"
        im.save(out / "images" / name)
        row = {"file_name": name, "prompt": rows[i]["prompt"], "prompt_index": i, "sample_index": j, "seed": seed}
        spec = rows[i].get("spec", rows[i] if "include" in rows[i] else None)
        meta.append({**row, **({"spec": json.dumps(spec)} if spec is not None else {})})
        entries.append({**row, "logprob": logp})
    write_atomic(out / "images" / "metadata.jsonl", "".join(json.dumps(m) + "\n" for m in meta))
    image_grid(pil, ncols=n_per_prompt if n_per_prompt > 1 else None).save(out / "grid.png")
    record = {**record, "n_prompts": len(rows), "n_per_prompt": n_per_prompt, "images": entries}
    write_atomic(out / "generation.json", json.dumps(record, indent=2) + "\n")
    log.info("wrote %d images for %d prompts to %s", len(pil), len(rows), out)
    return record


def write_captions(pipe: Pipeline, images_dir: Path, policy: SamplingPolicy, out: Path, record: dict[str, Any],
                   question: str | None = None, max_new_tokens: int = 32, batch_size: int = 16,
                   base_seed: int = 0) -> dict[str, Any]:
    """Caption (or answer `question` about) every image in a folder → JSON {settings, captions: [...]}."""
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    size = pipe.image_tokenizer.cfg.image_size
    codes = []
    for start in range(0, len(files), batch_size):
        batch = [Image.open(f) for f in files[start:start + batch_size]]
        codes.append(pipe.image_tokenizer.encode(pil_to_tensor(batch, size).to(_device_of(pipe.image_tokenizer))))
    codes = torch.cat(codes).to(_device_of(pipe.model))
    names = [str(f.relative_to(images_dir)) for f in files]
    seeds = [image_seed(base_seed, n, 0) for n in names]
    texts = generate_text(pipe.model, pipe.vocab, pipe.text_tokenizer, codes, policy,
                          [question] * len(files) if question else None, max_new_tokens, seeds, batch_size,
                          progress=True)
    record = {**record, "question": question, "max_new_tokens": max_new_tokens,
              "captions": [{"file_name": n, "text": t} for n, t in zip(names, texts)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(record, indent=2) + "\n")
    log.info("wrote %d captions to %s", len(texts), out)
    return record


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


cli = entry_point(main)
if __name__ == "__main__":
    cli()
