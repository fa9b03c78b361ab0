"""``python -m selftok.shapes <verb>``: export a split, evaluate a folder, write the held-out prompts.

    python -m selftok.shapes export --split train --n 1000 --out data/shapes_train [--size 64] [--seed 0]
    python -m selftok.shapes evaluate --images DIR [--metadata FILE] [--spec-key spec] --out report.json
    python -m selftok.shapes prompts --split heldout [--format jsonl|txt] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from selftok.runtime.cli import entry_point, setup_logging
from selftok.shapes.folder import evaluate_folder, export_split
from selftok.shapes.grammar import write_prompts
from selftok.shapes.spec import CATEGORIES
from selftok.shapes.split import SPLITS, heldout_prompts, split_specs

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selftok.shapes",
                                     description="The shapes world: export, evaluate, list prompts.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    ex = verbs.add_parser("export", help="render N examples of a split into an image folder + metadata.jsonl")
    ex.add_argument("--split", choices=SPLITS, required=True)
    ex.add_argument("--n", type=int, required=True, help="number of examples")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--size", type=int, default=64, help="image side in pixels (>= 32)")
    ex.add_argument("--seed", type=int, default=0)
    ev = verbs.add_parser("evaluate", help="judge a folder of images against their specs/prompts")
    ev.add_argument("--images", required=True, help="image folder (with metadata.jsonl, or GenEval layout)")
    ev.add_argument("--metadata", default=None, help="metadata JSONL (default: IMAGES/metadata.jsonl)")
    ev.add_argument("--spec-key", default="spec",
                    help="metadata column holding the spec (scene_spec: judge against the full scene)")
    ev.add_argument("--out", required=True, help="report JSON path")
    pr = verbs.add_parser("prompts", help="write the prompt list of a split (held-out: the fixed eval list)")
    pr.add_argument("--split", choices=SPLITS, default="heldout")
    pr.add_argument("--format", choices=("jsonl", "txt"), default="jsonl",
                    help="jsonl: GenEval specs (+ id, seed); txt: one prompt per line")
    pr.add_argument("--out", default=None, help="output file (default: stdout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.verb == "export":
        if args.n < 1 or args.size < 32:
            build_parser().error("--n must be >= 1 and --size >= 32")
        export_split(args.out, args.split, args.n, args.seed, args.size)
    elif args.verb == "evaluate":
        try:
            report = evaluate_folder(args.images, args.metadata, spec_key=args.spec_key)
        except FileNotFoundError as e:
            build_parser().error(str(e))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
        per = report["per_category"]
        cats = ", ".join(f"{t} {per[t]:.3f}" for t in CATEGORIES if t in per)
        logger.info("overall %.4f over %d images (%d errors); %s", report["overall"], report["n_images"],
                    report["n_errors"], cats)
        for err in report["errors"][:20]:
            logger.warning("%s: %s", err["file_name"], err["error"])
    else:
        if args.split == "heldout":
            entries = heldout_prompts()
            specs = [{k: v for k, v in e.items() if k not in ("id", "seed")} for e in entries]
            extra = [{"id": e["id"], "seed": e["seed"]} for e in entries]
        else:
            specs = [s for t in CATEGORIES for s in split_specs("train", t)]
            extra = None
        if args.out:
            write_prompts(args.out, specs, args.format, extra)
            logger.info("wrote %d %s prompts to %s", len(specs), args.split, args.out)
        else:
            for i, s in enumerate(specs):
                sys.stdout.write((s["prompt"] if args.format == "txt"
                                  else json.dumps({**s, **(extra[i] if extra else {})})) + "\n")
    return 0


cli = entry_point(main)
if __name__ == "__main__":
    cli()
