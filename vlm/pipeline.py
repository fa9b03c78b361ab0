"""A trained VLM and its Selftok tokenizer as one pipeline, and the folder writers built on it.

`load_pipeline` loads the pair and refuses mismatched ones (`check_pair`); `write_t2i` writes an imagefolder
of generated images (scored by `python -m selftok.shapes evaluate`), `write_captions` a JSON of captions.
The command line (`vlm.generate`), the held-out evaluation (`vlm.evaluation`) and RL use them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.grid import image_grid, pil_to_tensor, to_pil_images
from selftok.runtime.io import IMAGE_SUFFIXES, state_dict_sha256, write_atomic
from vlm.sampler import ImageTokens, device_of, generate_images, generate_text, image_seed
from vlm.sampling import SamplingPolicy
from vlm.vocab import Vocabulary, VocabularyError, tokenizer_fingerprint

log = logging.getLogger(__name__)


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
               text_tokenizer: Any = None, tokenizer_dir: str | Path = "the image tokenizer") -> None:
    """Refuse a model whose vocabulary record disagrees with the image tokenizer (K, codebook size, the weights
    that made its training codes), with its own embedding size, or with its text tokenizer."""
    problems = []
    if vocab.image_tokenizer_sha256:
        actual = state_dict_sha256(image_tokenizer)
        if actual != vocab.image_tokenizer_sha256:
            problems.append(f"the model was trained on the codes of the tokenizer with weights "
                            f"{vocab.image_tokenizer_sha256[:16]}… (vocab.json), "
                            f"{tokenizer_dir} has {actual[:16]}…")
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
    vocab = Vocabulary.load(model_dir)
    image_tokenizer = SelftokTokenizer.from_pretrained(tokenizer_dir, vae_path=vae_path, device=device).eval()
    text_tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                 attn_implementation=attn_implementation).to(device).eval()
    check_pair(vocab, image_tokenizer, model, text_tokenizer, tokenizer_dir)
    return Pipeline(model, vocab, text_tokenizer, image_tokenizer, str(model_dir), str(tokenizer_dir))


def write_t2i(pipe: Pipeline, rows: list[dict[str, Any]], policy: SamplingPolicy, n_per_prompt: int, out: Path,
              record: dict[str, Any], decoder: str = "renderer", steps: int = 50, batch_size: int = 16,
              base_seed: int = 0, seeds: list[int] | None = None) -> dict[str, Any]:
    """Generate `n_per_prompt` images per row → out/images/*.png + metadata.jsonl (an imagefolder that
    `python -m selftok.shapes evaluate --images out/images` scores), out/grid.png, out/generation.json."""
    captions = [row["prompt"] for row in rows for _ in range(n_per_prompt)]
    seeds = seeds or t2i_seeds(rows, n_per_prompt, base_seed)
    tokens, images = generate_images(pipe.model, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer, captions,
                                     policy, seeds, decoder, steps, batch_size, progress=True)
    return save_t2i(out, rows, n_per_prompt, seeds, tokens, images, record)


def t2i_seeds(rows: list[dict[str, Any]], n_per_prompt: int, base_seed: int = 0) -> list[int]:
    """The seed of each image `write_t2i` generates, prompt-major."""
    return [image_seed(base_seed, row["prompt"], j) for row in rows for j in range(n_per_prompt)]


def save_t2i(out: Path, rows: list[dict[str, Any]], n_per_prompt: int, seeds: list[int], tokens: ImageTokens,
             images: torch.Tensor, record: dict[str, Any]) -> dict[str, Any]:
    """Write generated images (prompt-major, `n_per_prompt` per row) and their record as `write_t2i` does."""
    jobs = [(i, j) for i in range(len(rows)) for j in range(n_per_prompt)]
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
        codes.append(pipe.image_tokenizer.encode(pil_to_tensor(batch, size).to(device_of(pipe.image_tokenizer))))
    codes = torch.cat(codes).to(device_of(pipe.model))
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
