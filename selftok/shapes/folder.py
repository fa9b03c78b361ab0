"""Image folders: export a split to an imagefolder with `metadata.jsonl`, and evaluate a folder of images.

Export layout (loadable with ``datasets.load_dataset("imagefolder", data_dir=DIR)``)::

    DIR/metadata.jsonl   {"file_name": "0000000.png", "caption": ..., "prompt": ..., "tag": ...,
                          "id": ..., "spec": "<JSON>", "scene_spec": "<JSON>"}
    DIR/0000000.png ...

`evaluate_folder` reads such a folder (any image format; `spec` may be a JSON string or an object, and rows
without one are parsed from `prompt`, `caption` or `text`), or GenEval's output layout
(``DIR/<index>/metadata.jsonl`` with one spec + ``DIR/<index>/samples/*.png``). Unreadable files and
unparseable rows become per-file errors in the report; the run never stops on them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from selftok.runtime.io import IMAGE_SUFFIXES
from selftok.shapes.dataset import iter_examples
from selftok.shapes.evaluator import (
    EvaluatorConfig,
    ImageError,
    aggregate,
    evaluate_image,
    failed_judgement,
    overall_standard_error,
)
from selftok.shapes.grammar import PromptParseError, parse_prompt
from selftok.shapes.spec import SpecError

logger = logging.getLogger(__name__)


def export_split(out_dir: str | Path, split: str, n: int, seed: int = 0, size: int = 64) -> Path:
    """Write the first `n` examples of (`split`, `seed`) as PNGs plus `metadata.jsonl`; returns the
    metadata path (written last, under a temporary name first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for ex in tqdm(iter_examples(split, seed, n, size), total=n, desc=f"export {split}", leave=False):
        # file names must not start with a split keyword ("train-..."): datasets would then infer splits
        # from the names and drop metadata.jsonl
        name = f"{ex.index:07d}.png"
        ex.image.save(out / name)
        row = ex.row()
        lines.append(json.dumps({"file_name": name, "caption": row["caption"], "prompt": row["prompt"],
                                 "tag": row["tag"], "id": row["id"], "spec": row["spec"],
                                 "scene_spec": row["scene_spec"]}))
    meta = out / "metadata.jsonl"
    tmp = meta.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    tmp.replace(meta)
    logger.info("wrote %d %s examples to %s", n, split, out)
    return meta


def evaluate_folder(images_dir: str | Path, metadata: str | Path | None = None,
                    config: EvaluatorConfig | None = None, spec_key: str = "spec") -> dict[str, Any]:
    """Judge every image listed in the folder's metadata; returns the JSON-ready report with `overall`,
    `overall_standard_error` (prompts as the sampled units; None with < 2 prompts per category),
    `per_category`, `counts`, `claims`, `n_images`, `n_errors`, `images` (one verdict per listed file, with
    claims and detected objects), `errors` (file, message) and `unlisted` (image files without metadata).

    `spec_key` picks the metadata column holding the spec (e.g. "scene_spec" to judge attribute
    preservation of reconstructions against their source scenes)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    entries = _entries(root, Path(metadata) if metadata else None, spec_key)
    images, errors, verdicts = [], [], []
    for path, spec, problem in tqdm(entries, desc="evaluate", leave=False):
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if problem is None:
            try:
                verdict = evaluate_image(path, spec, config)
            except (ImageError, SpecError) as e:
                problem = str(e)
        if problem is not None:
            verdict = failed_judgement(spec, problem)
            errors.append({"file_name": name, "error": problem})
        verdicts.append(verdict)
        images.append({"file_name": name, **verdict.to_dict()})
    listed = {p.resolve() for p, _, _ in entries}
    unlisted = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in listed)
    scores = aggregate(verdicts)
    se = overall_standard_error((v.tag, v.prompt, v.correct) for v in verdicts)
    return {"overall": scores.overall, "overall_standard_error": se, "per_category": scores.per_category,
            "counts": scores.counts, "claims": scores.claims, "n_images": scores.n, "n_errors": scores.n_errors,
            "errors": errors, "unlisted": unlisted, "images": images}


def _entries(root: Path, metadata: Path | None, spec_key: str) -> list[tuple[Path, Any, str | None]]:
    """(image path, spec or None, error or None) for every listed image."""
    meta = metadata or root / "metadata.jsonl"
    if meta.is_file():
        return _imagefolder_entries(meta, spec_key)
    subdirs = sorted(d for d in root.iterdir()
                     if (d / "metadata.jsonl").is_file() and (d / "samples").is_dir())
    if metadata is None and subdirs:
        out = []
        for d in subdirs:
            line = (d / "metadata.jsonl").read_text(encoding="utf-8").strip()
            spec, problem = _spec_of_line(line, spec_key)
            for img in sorted((d / "samples").iterdir()):
                out.append((img, spec, problem))
        return out
    raise FileNotFoundError(f"{meta}: no metadata file (expected an imagefolder metadata.jsonl or GenEval's "
                            "<index>/metadata.jsonl + <index>/samples/ layout)")


def _imagefolder_entries(meta: Path, spec_key: str) -> list[tuple[Path, Any, str | None]]:
    out = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((meta, None, f"{meta.name}:{lineno}: not JSON ({e})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            out.append((meta, None, f"{meta.name}:{lineno}: row has no 'file_name'"))
            continue
        spec, problem = _spec_of_row(row, spec_key)
        out.append((meta.parent / row["file_name"], spec, problem))
    return out


def _spec_of_line(line: str, spec_key: str) -> tuple[Any, str | None]:
    try:
        return _spec_of_row(json.loads(line), spec_key)
    except json.JSONDecodeError as e:
        return None, f"metadata is not JSON ({e})"


def _spec_of_row(row: dict[str, Any], spec_key: str) -> tuple[Any, str | None]:
    """The spec of a metadata row: `row[spec_key]` (object or JSON string), the row itself when it is a
    GenEval spec, else the grammar's parse of its prompt/caption/text."""
    spec = row.get(spec_key)
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            return None, f"column {spec_key!r} is not JSON ({e})"
    if spec is None and "include" in row:
        spec = row
    if spec is not None:
        return spec, None
    text = row.get("prompt") or row.get("caption") or row.get("text")
    if not isinstance(text, str):
        return None, f"row has no {spec_key!r}, 'include', 'prompt', 'caption' or 'text'"
    try:
        return parse_prompt(text), None
    except PromptParseError as e:
        return None, str(e)
