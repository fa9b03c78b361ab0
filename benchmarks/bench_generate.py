"""Benchmark: visual tokens/s of the batched, KV-cached CFG sampler against naive baselines in the same run,
and renderer decode time per image.

    python benchmarks/bench_generate.py --threads 1           # demo-sized Llama + the shipped shapes tokenizer
    python benchmarks/bench_generate.py --model runs/vlm/final --tokenizer runs/tok/final
    python benchmarks/bench_generate.py --batch-sizes 1 16 --dtype bf16 --out bench.json

Methods (all sample the same K visual tokens per image with guidance and the visual mask):
* ``ours``: `vlm.sampler.sample_tokens` — cond + uncond rows in ONE forward per token, KV cache;
* ``hf_generate_cfg``: `model.generate(guidance_scale=…, negative_prompt_ids=…)` — Hugging Face's
  guidance, which runs the unconditional branch as a second, separate (cached) pass each step;
* ``no_cache``: the full sequence is re-run every step, conditional and unconditional as two passes.
Visual tokens/s counts the B·K image tokens produced (not the unconditional rows).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from selftok.runtime.cli import setup_logging
from selftok.runtime.config import load_config
from vlm.model import LlamaSpec, ModelConfig, build_model, export_model
from vlm.sampler import decode_codes, left_pad, position_ids, sample_tokens
from vlm.sampling import SamplingPolicy, policy_logprobs, sample_from_logprobs
from vlm.vocab import Vocabulary

log = logging.getLogger("bench_generate")


ROOT = Path(__file__).resolve().parents[1]


def demo_setup(codebook_size: int, K: int, text_vocab: int, spec: LlamaSpec) -> tuple[torch.nn.Module, Vocabulary]:
    """A randomly initialised model of the demo size (speed does not depend on the weights)."""
    vocab = Vocabulary(visual_offset=text_vocab + 3, codebook_size=codebook_size, K=K, order="ar", bos_id=1,
                       eos_id=2, pad_id=3, boi_id=text_vocab, eoi_id=text_vocab + 1, uncond_id=text_vocab + 2)
    model = export_model(build_model(ModelConfig(llama=spec, new_rows_init="normal"), vocab))
    return model.eval(), vocab


def prompts_for(vocab: Vocabulary, batch: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 14, (batch,), generator=g).tolist()  # caption lengths of the shapes grammar
    return [vocab.t2i_prompt(torch.randint(4, vocab.visual_offset - 3, (n,), generator=g).tolist()) for n in lengths]


class _Mask(LogitsProcessor):
    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, input_ids, scores):
        return scores.masked_fill(~self.allowed.to(scores.device), float("-inf"))


def run_ours(model, vocab, prompts, policy):
    return sample_tokens(model, prompts, policy, vocab.visual_mask(), vocab.K, list(range(len(prompts))),
                         vocab.pad_id, uncond_prompts=[vocab.uncond_prompt()] * len(prompts)).token_ids


def run_hf_generate(model, vocab, prompts, policy):
    ids, attn = left_pad(prompts, vocab.pad_id)
    uncond = torch.tensor([vocab.uncond_prompt()] * len(prompts))
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                         temperature=policy.temperature, guidance_scale=policy.cfg_scale,
                         negative_prompt_ids=uncond, negative_prompt_attention_mask=torch.ones_like(uncond),
                         max_new_tokens=vocab.K, min_new_tokens=vocab.K, pad_token_id=vocab.pad_id,
                         logits_processor=LogitsProcessorList([_Mask(vocab.visual_mask())]))
    return out[:, ids.shape[1]:]


@torch.no_grad()
def run_no_cache(model, vocab, prompts, policy):
    """Naive: re-run the whole sequence every step; the unconditional branch is a second pass."""
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    cond = [list(p) for p in prompts]
    uncond = [vocab.uncond_prompt() for _ in prompts]
    allowed = vocab.visual_mask()
    for k in range(vocab.K):
        logits = []
        for rows in (cond, uncond):
            ids, attn = left_pad(rows, vocab.pad_id)
            logits.append(model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn),
                                use_cache=False, logits_to_keep=1).logits[:, -1])
        tok = sample_from_logprobs(policy_logprobs(logits[0], logits[1], policy, k, vocab.K, allowed), gens)
        for rows in (cond, uncond):
            for row, t in zip(rows, tok.tolist()):
                row.append(t)
    return torch.tensor([row[-vocab.K:] for row in cond])


METHODS = {"ours": run_ours, "hf_generate_cfg": run_hf_generate, "no_cache": run_no_cache}


def time_methods(names: list[str], model, vocab, prompts, policy, autocast, repeats: int) -> dict[str, float]:
    """Best wall time per method over `repeats` rounds after a warm-up round; the methods take turns within
    each round, so load from other processes on a shared machine hits them alike."""
    best = {name: float("inf") for name in names}
    for i in range(repeats + 1):
        for name in names:
            start = time.perf_counter()
            with autocast():
                tokens = METHODS[name](model, vocab, prompts, policy)
            elapsed = time.perf_counter() - start
            assert tokens.shape == (len(prompts), vocab.K) and vocab.is_visual(tokens).all()
            if i:
                best[name] = min(best[name], elapsed)
    return best


def load_image_tokenizer(directory: str | None, preset: str | None, train_config: str):
    """A trained tokenizer folder, or a randomly initialised preset or training config's model (decode time does
    not depend on the weights)."""
    from selftok.model.presets import get_preset
    from selftok.model.tokenizer import SelftokTokenizer
    from selftok.train import TrainConfig
    if directory:
        return SelftokTokenizer.from_pretrained(directory).eval()
    torch.manual_seed(0)
    return SelftokTokenizer(get_preset(preset) if preset else load_config(TrainConfig, train_config).model).eval()


def time_decoders(tokenizer, batch: int, autocast, repeats: int, steps: int) -> dict:
    """Seconds per image of the one-step renderer and of the `steps`-step diffusion decoder (batch `batch`)."""
    codes = torch.randint(0, tokenizer.codebook_size, (batch, tokenizer.K), generator=torch.Generator().manual_seed(0))
    calls = {"renderer": lambda: decode_codes(tokenizer, codes, "renderer", batch_size=batch)}
    if tokenizer.decoder is not None and steps > 0:
        calls[f"diffusion_{steps}_steps"] = lambda: decode_codes(tokenizer, codes, "diffusion", steps, batch_size=batch)
    out = {"batch": batch, "image_size": tokenizer.cfg.image_size}
    for name, call in calls.items():
        if name not in ("renderer",) and repeats > 1:
            repeats = 1  # the diffusion decoder is slow on a CPU: one timed run after the warm-up
        best = float("inf")
        for i in range(repeats + 1):
            start = time.perf_counter()
            with autocast():
                call()
            if i:
                best = min(best, time.perf_counter() - start)
        out[f"{name}_seconds_per_image"] = best / batch
        log.info("%s: %.4f s per image (batch %d)", name, best / batch, batch)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="trained VLM folder (default: a demo-sized random Llama)")
    p.add_argument("--tokenizer", default=None, help="trained Selftok tokenizer folder (default: random weights)")
    p.add_argument("--tokenizer-config", default=str(ROOT / "configs" / "tokenizer_shapes_pixel.yaml"),
                   help="training config whose model section is timed with random weights")
    p.add_argument("--tokenizer-preset", default=None,
                   help="a selftok.model.presets name instead of --tokenizer-config")
    p.add_argument("--decoder-steps", type=int, default=50, help="diffusion decoder steps to time (0: skip)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="autocast dtype on CPU (never fp16)")
    p.add_argument("--text-vocab", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation (all methods)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_image_tokenizer(args.tokenizer, args.tokenizer_preset, args.tokenizer_config)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                     attn_implementation=args.attn).eval()
        vocab = Vocabulary.load(args.model)
    else:
        model, vocab = demo_setup(tokenizer.codebook_size, tokenizer.K, args.text_vocab, LlamaSpec())
        model.set_attn_implementation(args.attn)
    device = next(model.parameters()).device

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    policy = SamplingPolicy(cfg_scale=args.cfg_scale)
    n_params = sum(q.numel() for q in model.parameters())
    results = {"load_average_before": os.getloadavg(), "model": args.model or "demo LlamaSpec() random init", "params": n_params, "K": vocab.K,
               "vocab_rows": vocab.model_vocab_size, "dtype": args.dtype, "attn": args.attn, "threads": torch.get_num_threads(),
               "cfg_scale": args.cfg_scale, "sampling": {}}
    for batch in args.batch_sizes:
        prompts = prompts_for(vocab, batch)
        row = {}
        for name, seconds in time_methods(args.methods, model, vocab, prompts, policy, autocast,
                                          args.repeats).items():
            row[name] = {"seconds": seconds, "visual_tokens_per_s": batch * vocab.K / seconds}
            log.info("batch %d %-16s %.3f s  %.1f visual tokens/s", batch, name, seconds, batch * vocab.K / seconds)
        if "ours" in row:
            for name in [n for n in row if n != "ours"]:
                row[f"speedup_vs_{name}"] = row[name]["seconds"] / row["ours"]["seconds"]
        results["sampling"][str(batch)] = row
    results["tokenizer"] = args.tokenizer or f"{args.tokenizer_preset or args.tokenizer_config} (random init)"
    results["decoding"] = time_decoders(tokenizer, max(args.batch_sizes), autocast, args.repeats, args.decoder_steps)
    results["load_average_after"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)  # the benchmark's output is its report
    if args.out:
        Path(args.out).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
