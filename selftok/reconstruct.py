"""Reconstruct a folder of images through a Selftok tokenizer: side-by-side grids and PSNR.

    python -m selftok.reconstruct tokenizer=runs/tok images=photos/ out=recon/
    python -m selftok.reconstruct official=tokenizer_512_ckpt.pth official_yaml=256-eval.yml \
        vae_path=/models/sd3-medium-diffusers images=photos/ out=recon/ decoder=diffusion steps=50

Each image is resized (short side, bilinear) and centre-cropped to the tokenizer's image size, encoded,
and decoded with the diffusion decoder and/or the renderer. Writes ``<name>.png`` (input | reconstructions,
left to right) and ``psnr.json``: 8-bit PSNR per image and mean, against the input and — with SD3-VAE
latents — against the VAE's own reconstruction (the official evaluation protocol).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from selftok.data.images import TransformConfig, decode_image
from selftok.loaders.official import load_tokenizer
from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.cli import entry_point, parse_run_config, run_parser, setup_logging
from selftok.runtime.config import to_dict
from selftok.runtime.grid import save_grid, to_pil_images
from selftok.runtime.io import IMAGE_SUFFIXES
from selftok.training.metrics import psnr

log = logging.getLogger(__name__)


@dataclass
class ReconstructConfig:
    images: str = ""
    """Folder of input images (png, jpg, jpeg, webp, bmp)."""
    out: str = ""
    """Output folder for the grids and psnr.json."""
    tokenizer: str | None = None
    """A directory written by SelftokTokenizer.save_pretrained."""
    official: str | None = None
    """Or an official checkpoint (.pth), with official_yaml (optional) and vae_path."""
    official_yaml: str | None = None
    vae_path: str | None = None
    """Local diffusers SD3 VAE directory (SD3-VAE tokenizers only)."""
    decoder: Literal["auto", "diffusion", "renderer", "both"] = "auto"
    """Which decoder(s) to run; auto = every one the checkpoint carries."""
    steps: int = 50
    """Diffusion decoder steps."""
    batch_size: int = 4
    seed: int = 0
    """Seed of the diffusion decoder's starting noise."""
    device: str = "cpu"
    bf16: bool = False
    """Run under bfloat16 autocast (the codebook lookup stays float32)."""

    def __post_init__(self) -> None:
        if not self.images or not self.out:
            raise ValueError("images=<folder> and out=<folder> are required")
        if (self.tokenizer is None) == (self.official is None):
            raise ValueError("give exactly one of tokenizer=<dir> or official=<checkpoint.pth>")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")


def load_image(path: Path, size: int) -> torch.Tensor:
    """The training and pre-tokenization transform (`selftok.data.images`): (3, size, size) in [0, 1]."""
    return decode_image(path.read_bytes(), TransformConfig(image_size=size)).float() / 255


def decoders_to_run(tok: SelftokTokenizer, choice: str) -> list[str]:
    available = [n for n, part in (("diffusion", tok.decoder), ("renderer", tok.renderer)) if part is not None]
    wanted = available if choice in ("auto", "both") else [choice]
    missing = [n for n in wanted if n not in available] + (["diffusion", "renderer"] if not available else [])
    if missing or (choice == "both" and len(available) < 2):
        raise ValueError(f"decoder={choice}: this tokenizer carries {available or 'no decoder'}")
    return wanted


def reconstruct_batch(tok: SelftokTokenizer, images: torch.Tensor, names: list[str], cfg: ReconstructConfig,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
    codes = tok.encode(images)
    out = {}
    for name in names:
        out[name] = tok.decode(codes, cfg.steps, generator) if name == "diffusion" else tok.render(codes)
    if tok.cfg.latent.kind == "sd3_vae":  # the official reference image: the VAE's own reconstruction
        out["vae"] = tok.latents.decode(tok.latents.encode(images))
    return {k: v.float().cpu() for k, v in out.items()}


def run(cfg: ReconstructConfig) -> dict:
    tok = load_tokenizer(cfg.tokenizer or cfg.official, cfg.official_yaml, cfg.vae_path).to(cfg.device)
    names = decoders_to_run(tok, cfg.decoder)
    paths = sorted(p for p in Path(cfg.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {cfg.images}")
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    records = []
    for start in tqdm(range(0, len(paths), cfg.batch_size), desc="reconstruct", unit="batch"):
        batch = paths[start:start + cfg.batch_size]
        images = torch.stack([load_image(p, tok.cfg.image_size) for p in batch]).to(cfg.device)
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            recon = reconstruct_batch(tok, images, names, cfg, generator)
        images = images.cpu()
        scores = {n: psnr(recon[n], images).tolist() for n in names}
        vae_scores = {n: psnr(recon[n], recon["vae"]).tolist() for n in names} if "vae" in recon else {}
        for i, path in enumerate(batch):
            columns = torch.stack([images[i]] + [recon[n][i] for n in names])
            save_grid(to_pil_images(columns), out_dir / f"{path.stem}.png", ncols=len(columns), pad=0)
            rec = {"name": path.name, "psnr": {n: scores[n][i] for n in names}}
            if vae_scores:
                rec["psnr_vs_vae"] = {n: vae_scores[n][i] for n in names}
            records.append(rec)
    summary = {"mean_psnr": {n: float(np.mean([r["psnr"][n] for r in records])) for n in names}}
    if records and "psnr_vs_vae" in records[0]:
        summary["mean_psnr_vs_vae"] = {n: float(np.mean([r["psnr_vs_vae"][n] for r in records])) for n in names}
    result = {**summary, "images": records, "config": to_dict(cfg), "steps": cfg.steps}
    (out_dir / "psnr.json").write_text(json.dumps(result, indent=2))
    log.info("reconstructed %d images into %s: %s", len(records), out_dir, summary)
    return result


def main(argv: list[str] | None = None) -> int:
    """Reconstruct per the config (results in ``out/psnr.json``); returns the exit status."""
    setup_logging()
    parser = run_parser("selftok.reconstruct", "Reconstruct a folder of images: side-by-side grids + PSNR JSON.")
    cfg, _ = parse_run_config(ReconstructConfig, parser, argv)
    run(cfg)
    return 0


cli = entry_point(main)
if __name__ == "__main__":
    cli()
