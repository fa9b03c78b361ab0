"""Tokenizers shipped inside the package, the way users of the paper start from the released tokenizer.

A shipped tokenizer is a `save_pretrained` folder plus its records:

- ``model.safetensors``, ``config.yaml`` — the tokenizer (load with `load_shipped`);
- ``training_summary.json`` — the training run's ``summary.json`` (held-out figures of every stage, wall-clock);
- ``eval/`` — the run's last held-out evaluation of each stage (``<stage>_step<N>*.json`` and grids);
- ``evaluation.json`` — the command that produced it and the held-out figures of a small subset, recomputed
  by the tests (``tests/test_shipped_tokenizer.py``) to show that the shipped files reproduce them;
- ``manifest.json`` — the SHA-256 of every other file; `shipped_dir` refuses a folder whose files no longer
  match it, naming the file.

Write one from a finished run with ``python -m selftok.pretrained ship RUN_DIR NAME --command "..."``; put one
where a training run would have left it (``OUT/model``, ``OUT/eval``, ``OUT/summary.json``, as the demo does)
with ``python -m selftok.pretrained install NAME OUT``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from selftok.data.images import TransformConfig
from selftok.data.sources import DataConfig, ShapesSourceConfig
from selftok.model.tokenizer import CONFIG_NAME, SelftokTokenizer, TokenizerConfig
from selftok.runtime.config import load_config
from selftok.runtime.io import replace_dir, sha256_file
from selftok.training.evaluation import (EvalConfig, HeldOut, encode_heldout, judge_attributes, reconstruct,
                                         shape_accuracy, shape_confusion)
from selftok.training.metrics import psnr

ROOT = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
EVALUATION = "evaluation.json"
SUMMARY = "training_summary.json"
MODEL_FILES = ("model.safetensors", "config.yaml")
EVAL_DIR = "eval"
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


def shipped_config(name: str = "shapes", root: Path = ROOT) -> TokenizerConfig:
    """The config of shipped tokenizer `name`, read without checking or loading its weights."""
    return load_config(TokenizerConfig, root / name / CONFIG_NAME)


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
    """Record the SHA-256 of every file under `directory` in ``directory/manifest.json``; returns them."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}
    (directory / MANIFEST).write_text(json.dumps({"sha256": digests}, indent=2) + "\n")
    return digests


def manifest_digest(name: str = "shapes", root: Path = ROOT) -> str:
    """SHA-256 of the shipped tokenizer's manifest: one string that changes with any of its files."""
    return hashlib.sha256((root / name / MANIFEST).read_bytes()).hexdigest()


def install(name: str, out_dir: Path, expect: str | None = None, root: Path = ROOT) -> Path:
    """Lay out the checked shipped tokenizer `name` as a finished `selftok.train` run in `out_dir`:
    ``model/`` (the tokenizer), ``eval/`` (its held-out evaluations), ``summary.json`` and ``shipped.json``
    (which tokenizer, its manifest digest). `expect`: the manifest digest the caller planned with (refused
    when the shipped files changed since)."""
    source = shipped_dir(name, root)
    digest = manifest_digest(name, root)
    if expect is not None and digest != expect:
        raise ShippedFileError(f"shipped tokenizer {name!r} changed: its manifest has SHA-256 {digest}, "
                               f"expected {expect}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    for f in MODEL_FILES:
        shutil.copyfile(source / f, tmp / "model" / f)
    shutil.copytree(source / EVAL_DIR, tmp / EVAL_DIR)
    shutil.copyfile(source / SUMMARY, tmp / "summary.json")
    (tmp / "shipped.json").write_text(json.dumps({"name": name, "source": str(source),
                                                  "manifest_sha256": digest}, indent=2) + "\n")
    replace_dir(tmp, out_dir)
    return out_dir
