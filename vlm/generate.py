"""The generation command line: ``python -m vlm.generate t2i | caption | evaluate``.

`t2i` writes an imagefolder of generated images, `caption` a JSON of captions, `evaluate` the held-out
shapes-world evaluation (`vlm.evaluation`); the sampling itself is `vlm.sampler`, the model + tokenizer pair
`vlm.pipeline`. See docs/generation.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from selftok.runtime.cli import entry_point, setup_logging
from selftok.runtime.config import to_dict
from vlm.evaluation import evaluate_shapes
from vlm.pipeline import Pipeline, load_pipeline, write_captions, write_t2i
from vlm.sampling import SamplingPolicy


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


POLICY_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(SamplingPolicy)}
"""Each `SamplingPolicy` field's command-line flag."""


def _add_policy_args(p: argparse.ArgumentParser, text: bool) -> None:
    """One flag per `SamplingPolicy` field (`POLICY_FLAGS`; tests check the two agree)."""
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


def policy_args(policy: SamplingPolicy) -> list[str]:
    """The sampling-policy flags that make a verb sample with `policy` (the inverse of `check_settings`)."""
    argv = []
    for f in dataclasses.fields(SamplingPolicy):
        value = getattr(policy, f.name)
        if value is not None:
            argv += [POLICY_FLAGS[f.name], str(value)]
    return argv


def check_settings(args: argparse.Namespace) -> SamplingPolicy:
    """A verb's settings → its sampling policy; ValueError with the message the command line prints (the
    playground, `vlm.playground`, shows the same messages)."""
    policy = SamplingPolicy(**{name: getattr(args, name) for name in POLICY_FLAGS})
    text = args.verb == "caption"
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if text and (policy.guided or policy.vocabulary == "visual"):
        raise ValueError("captions need --cfg-scale 1 and --vocabulary text (or all)")
    if not text and policy.vocabulary == "text":
        raise ValueError("images need --vocabulary visual (or all)")
    if not text and (args.n_per_prompt < 1 or (args.decoder == "diffusion" and args.steps < 1)):
        raise ValueError("--n-per-prompt and --steps must be >= 1")
    return policy


def settings_record(args: argparse.Namespace, pipe: Pipeline, policy: SamplingPolicy) -> dict[str, Any]:
    """The settings part of a verb's JSON record (generation.json, captions.json, summary.json)."""
    record = {"model": str(Path(args.model).resolve()), "tokenizer": str(Path(args.tokenizer).resolve()),
              "vocab": pipe.vocab.to_dict(), "tokenizer_config": to_dict(pipe.image_tokenizer.cfg),
              "sampling": to_dict(policy), "seed": args.seed, "batch_size": args.batch_size, "dtype": args.dtype,
              "device": args.device}
    if args.verb != "caption":
        record.update(decoder=args.decoder, steps=args.steps if args.decoder == "diffusion" else None)
    return record


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
        p.add_argument("--seed", type=int, default=0, help="base seed (evaluate: the captioned scenes' stream; "
                       "the held-out prompts keep their fixed seeds)")
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
            p.add_argument("--n-captions", type=int, default=96,
                           help="scenes to caption, held-out and again of training compositions (0: skip)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the verb (its record goes to ``--out``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        policy = check_settings(args)
    except ValueError as e:
        parser.error(str(e))
    pipe = load_pipeline(args.model, args.tokenizer, args.device, args.vae, args.attn)
    record = settings_record(args, pipe, policy)
    with autocast(args.device, args.dtype):
        if args.verb == "t2i":
            rows = [{"prompt": args.prompt}] if args.prompt is not None else read_prompts(args.prompts)
            if not rows:
                parser.error(f"{args.prompts}: no prompts")
            write_t2i(pipe, rows, policy, args.n_per_prompt, Path(args.out), record, args.decoder,
                      args.steps, args.batch_size, args.seed)
        elif args.verb == "caption":
            write_captions(pipe, Path(args.images), policy, Path(args.out), record, args.question,
                           args.max_new_tokens, args.batch_size, args.seed)
        else:
            evaluate_shapes(pipe, policy, Path(args.out), record, args.n_per_prompt, args.n_captions,
                            args.decoder, args.steps, args.batch_size, args.max_new_tokens, args.seed)
    return 0


def autocast(device: str, dtype: str):
    """The --dtype autocast context (bf16) or none (fp32)."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


cli = entry_point(main)
if __name__ == "__main__":
    cli()
