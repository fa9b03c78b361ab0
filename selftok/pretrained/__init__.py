"""Tokenizers shipped inside the package, the way users of the paper start from the released tokenizer.

A shipped tokenizer is a `save_pretrained` folder plus its records:

- ``model.safetensors``, ``config.yaml`` — the tokenizer (load with `load_shipped`);
- ``manifest.json`` — the SHA-256 of every file above; `shipped_dir` refuses a folder whose files no longer
  match it, naming the file;
- ``training_summary.json`` — the training run's ``summary.json`` (held-out figures of every stage, wall-clock);
- ``evaluation.json`` — the command that produced it and the held-out figures of a small subset, recomputed
  by the tests (``tests/test_shipped_tokenizer.py``) to show that the shipped files reproduce them.

Write one from a finished run with ``python -m selftok.pretrained RUN_DIR NAME --command "..."``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from selftok.data.images import TransformConfig
from selftok.data.sources import DataConfig, ShapesSourceConfig
from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.io import sha256_file
from selftok.training.evaluation import (EvalConfig, HeldOut, encode_heldout, judge_attributes, reconstruct,
                                         shape_accuracy, shape_confusion)
from selftok.training.metrics import psnr

ROOT = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
EVALUATION = "evaluation.json"
SUMMARY = "training_summary.json"
CHECKED_FILES = ("model.safetensors", "config.yaml")
SUBSET = 32
"""Held-out images whose renderer figures `evaluation.json` records for the tests to recompute."""


class ShippedFileError(ValueError):
    """A shipped tokenizer's files are missing or differ from their manifest."""


def shipped_names() -> list[str]:
    """Names of the shipped tokenizers (folders holding a manifest)."""
    return sorted(p.parent.name for p in ROOT.glob(f"*/{MANIFEST}"))


def shipped_dir(name: str = "shapes", root: Path = ROOT) -> Path:
    """The folder of shipped tokenizer `name`, after checking every file against its manifest."""
    directory = root / name
    manifest = directory / MANIFEST
    if not manifest.is_file():
        known = ", ".join(shipped_names()) or "none"
        raise ShippedFileError(f"no shipped tokenizer {name!r} ({manifest} is missing); shipped: {known}")
    recorded = json.loads(manifest.read_text())["sha256"]
    for file, digest in recorded.items():
        path = directory / file
        if not path.is_file():
            raise ShippedFileError(f"shipped tokenizer {name!r}: {path} is missing (recorded in {manifest})")
        actual = sha256_file(path)
        if actual != digest:
            raise ShippedFileError(f"shipped tokenizer {name!r}: {path} has SHA-256 {actual}, but {manifest} "
                                   f"records {digest} (a changed, truncated or Git-LFS-pointer file)")
    return directory


def load_shipped(name: str = "shapes", device: str = "cpu") -> SelftokTokenizer:
    """`SelftokTokenizer.from_pretrained` of the checked shipped folder."""
    return SelftokTokenizer.from_pretrained(shipped_dir(name), device=device)


@torch.no_grad()
def subset_figures(tok: SelftokTokenizer, n: int = SUBSET) -> dict:
    """Renderer figures of `tok` on the first `n` held-out scenes (the training evaluation's, at the
    tokenizer's image size): mean PSNR, attribute preservation, per-object shape accuracy, and the codes
    themselves (what the tests compare)."""
    size = tok.cfg.image_size
    data = DataConfig(kind="shapes", shapes=ShapesSourceConfig(split="heldout", n=n, seed=0, size=size),
                      transform=TransformConfig(image_size=size))
    held = HeldOut(EvalConfig(data=data, num_images=n))
    codes = encode_heldout(tok, held, batch_size=n)
    recons = reconstruct(tok, codes, "renderer", steps=1, seed=0, batch_size=n, autocast=False)
    judged = judge_attributes(recons, held.specs)
    return {"images": n, "psnr": float(psnr(recons, held.pixels.float() / 255).mean()),
            "attribute_preservation": sum(judged) / len(judged),
            "shape_accuracy": shape_accuracy(shape_confusion(recons, held.scenes)), "codes": codes.tolist()}


def write_manifest(directory: Path) -> dict[str, str]:
    """Record the SHA-256 of `CHECKED_FILES` in ``directory/manifest.json``; returns them."""
    digests = {f: sha256_file(directory / f) for f in CHECKED_FILES}
    (directory / MANIFEST).write_text(json.dumps({"sha256": digests}, indent=2) + "\n")
    return digests
