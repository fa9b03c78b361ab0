"""Benchmark pre-tokenization: pipeline images/s vs the encoder-only forward, and bytes per image on disk.

    python benchmarks/bench_pretokenize.py [--n 1024] [--batch-size 64] [--num-workers 1] [--preset shapes-64]

In one run: (1) encoder-only throughput — `tok.encode` on batches of already-prepared images, the ceiling;
(2) the full pipeline — `selftok.pretokenize.pretokenize` on the shapes world (render, transform, collate,
encode, uint16 AR shards, manifest) end to end, including the weight hash and the manifest; the overhead is
1 − (2)/(1); (3) storage — the shards' bytes per image against one int64 ``.npy`` file per image (the peers'
token cache) of the same codes, as file sizes and as allocated disk blocks. The tokenizer is the preset with
random weights: a trained one costs the same compute (but its codes compress less, see docs/pretokenize.md).
Runs on CUDA when available (like `pretokenize`), else on the CPU. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from selftok.data.shards import ar_to_encoder_order, iter_token_batches, open_token_shards
from selftok.data.sources import DataConfig, ImageSource
from selftok.model.presets import get_preset
from selftok.model.tokenizer import SelftokTokenizer
from selftok.pretokenize import PretokenizeConfig, pretokenize
from selftok.runtime.config import from_dict


def encoder_throughput(tok: SelftokTokenizer, images: torch.Tensor, batch_size: int, precision: str) -> float:
    """Images/s of `tok.encode` alone over `images` already on the device (one warm-up batch first)."""
    device = images.device
    ctx = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
    with ctx:
        tok.encode(images[:batch_size])
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            codes = tok.encode(images[i:i + batch_size])
        codes.cpu()  # the pipeline also brings every batch of codes back to the host
        _sync(device)
    return len(images) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def disk_bytes(paths: list[Path]) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of files."""
    stats = [p.stat() for p in paths]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--preset", default="shapes-64")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="alternating encoder / pipeline measurements")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the device pretokenize picks
    tok = SelftokTokenizer(get_preset(args.preset)).eval().to(device)
    size = tok.cfg.image_size
    data = {"kind": "shapes", "shapes": {"n": args.n, "size": size}, "transform": {"image_size": size}}
    source = ImageSource(from_dict(DataConfig, data))
    images = (torch.stack([source[i].pixels for i in range(args.n)]).float() / 255).to(device)

    encoder, pipeline = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            encoder.append(encoder_throughput(tok, images, args.batch_size, args.precision))
            cfg = from_dict(PretokenizeConfig, {
                "data": data, "output": {"dir": f"{tmp}/run{r}", "shard_size": args.shard_size},
                "run": {"batch_size": args.batch_size, "num_workers": args.num_workers, "progress": False,
                        "mixed_precision": "bf16" if args.precision == "bf16" else "no"}})
            start = time.perf_counter()
            manifest = pretokenize(cfg, tok)
            pipeline.append(args.n / (time.perf_counter() - start))
            assert manifest.complete and manifest.counts["written"] == args.n

        out = Path(tmp) / "run0"
        shard_files = [out / name for name in manifest.shards]
        npy_dir = Path(tmp) / "npy"
        npy_dir.mkdir()
        _, ds = open_token_shards(out, in_memory=True)
        for batch in iter_token_batches(ds, 256):  # the peers' cache: one int64 .npy per image, encoder order
            for sample_id, row in zip(batch.ids, ar_to_encoder_order(batch.tokens)):
                np.save(npy_dir / f"{sample_id}.npy", row.numpy().astype(np.int64))
        shard_bytes, shard_alloc = disk_bytes(shard_files)
        npy_bytes, npy_alloc = disk_bytes(sorted(npy_dir.iterdir()))

    enc, pipe = statistics.median(encoder), statistics.median(pipeline)
    result = {
        "preset": args.preset, "K": tok.K, "codebook_size": tok.codebook_size, "image_size": size, "n": args.n,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "precision": args.precision,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)),
        "encoder_images_per_s": [round(x, 1) for x in encoder], "pipeline_images_per_s": [round(x, 1) for x in pipeline],
        "pipeline_over_encoder": round(pipe / enc, 3), "pipeline_overhead": round(1 - pipe / enc, 3),
        "shard_bytes_per_image": round(shard_bytes / args.n, 1), "npy_int64_bytes_per_image": round(npy_bytes / args.n, 1),
        "npy_over_shards": round(npy_bytes / shard_bytes, 2),
        "shard_allocated_bytes_per_image": round(shard_alloc / args.n, 1),
        "npy_allocated_bytes_per_image": round(npy_alloc / args.n, 1),
        "raw_uint16_bytes_per_image": 2 * tok.K,
    }
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
