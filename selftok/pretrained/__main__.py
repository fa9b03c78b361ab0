"""Ship a finished training run's tokenizer inside the package, or lay a shipped one out as a run:

    python -m selftok.pretrained ship RUN_DIR NAME --command "python -m selftok.train --config ..."
    python -m selftok.pretrained install NAME OUT_DIR [--sha256 MANIFEST_DIGEST]

``ship`` copies ``RUN_DIR/model`` to ``selftok/pretrained/NAME`` (replacing it atomically; floats stored in
float16, half the file — the tokenizer still computes in fp32) with the run's summary, its last evaluation of
each stage, the stored weights' own figures on the run's held-out set and on the subset the tests recompute,
the command, and the manifest of checksums. ``install`` checks the manifest and writes ``OUT_DIR/model``, ``OUT_DIR/eval`` and
``OUT_DIR/summary.json``, where ``selftok.train`` would have (the demo's tokenizer stage).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from selftok.model.tokenizer import SelftokTokenizer
from selftok.pretrained import (EVAL_DIR, EVALUATION, MODEL_FILES, ROOT, SUBSET, SUMMARY, ShippedFileError,
                                install, subset_figures, write_manifest)
from selftok.runtime.config import from_dict
from selftok.runtime.io import replace_dir
from selftok.training.evaluation import EvalConfig, HeldOut, encode_heldout, evaluate_stage, last_evaluations


def heldout_figures(tok: SelftokTokenizer, run_dir: Path, work: Path) -> dict:
    """The shipped weights' figures on the run's own held-out evaluation (its pinned ``eval`` config): the
    renderer and, when there is one, the diffusion decoder."""
    pinned = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    cfg = from_dict(EvalConfig, pinned.get("eval"), "eval")
    held = HeldOut(cfg)
    codes = encode_heldout(tok, held, cfg.batch_size)
    parts = [p for p in ("renderer", "decoder") if getattr(tok, p) is not None]
    return {p: evaluate_stage(tok, held, codes, cfg, p, work, p, autocast=False) for p in parts}


def ship(run_dir: Path, name: str, command: str, root: Path = ROOT, subset: int = SUBSET,
         dtype: torch.dtype | None = torch.float16, heldout: bool = True) -> Path:
    """Copy the run's tokenizer (its floats stored in `dtype`: half the file; it computes in fp32) and
    records into ``root/name``; `heldout` re-evaluates the stored weights on the run's held-out set."""
    model, summary = run_dir / "model", run_dir / "summary.json"
    for path in [model / f for f in MODEL_FILES] + [summary, run_dir / "config.yaml"]:
        if not path.is_file():
            raise SystemExit(f"{path} is missing: is {run_dir} a finished selftok.train run?")
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / EVAL_DIR).mkdir(parents=True)
    SelftokTokenizer.from_pretrained(model).save_pretrained(tmp, dtype=dtype)
    for path in (p for _, files in last_evaluations(run_dir / "eval").values() for p in files):
        shutil.copyfile(path, tmp / EVAL_DIR / path.name)
    shutil.copyfile(summary, tmp / SUMMARY)
    tok = SelftokTokenizer.from_pretrained(tmp)
    record = {"command": command, "run_dir": str(run_dir), "shipped": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "stored_dtype": str(dtype or "as trained").replace("torch.", ""),
              "subset": subset_figures(tok, subset)}
    if heldout:
        with tempfile.TemporaryDirectory() as work:
            record["heldout"] = heldout_figures(tok, run_dir, Path(work))
    (tmp / EVALUATION).write_text(json.dumps(record) + "\n")
    write_manifest(tmp)
    replace_dir(tmp, root / name)
    return root / name


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m selftok.pretrained", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="action", required=True)
    s = sub.add_parser("ship", help="copy a finished run's tokenizer into selftok/pretrained/NAME")
    s.add_argument("run_dir", type=Path)
    s.add_argument("name")
    s.add_argument("--command", required=True, help="the exact command(s) that produced the run")
    i = sub.add_parser("install", help="write a shipped tokenizer as a finished run: OUT_DIR/model, eval, summary")
    i.add_argument("name")
    i.add_argument("out_dir", type=Path)
    i.add_argument("--sha256", default=None, help="refuse unless the shipped manifest has this SHA-256")
    args = ap.parse_args(argv)
    if args.action == "ship":
        print(f"shipped {args.run_dir} as {ship(args.run_dir, args.name, args.command)}")
        return
    try:
        print(f"installed shipped tokenizer {args.name!r} in {install(args.name, args.out_dir, args.sha256)}")
    except ShippedFileError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
