"""Training throughput of the VLM: tokens/s, model FLOPs utilisation, and the data pipeline's overhead.

    python benchmarks/bench_vlm_train.py --config configs/vlm_shapes.yaml [--shards DIR] [--steps 20] [key=value ...]

MFU = 6 · N · tokens/s / peak, with N the parameters that take part in matmuls (all but the input embedding
lookup), tokens the non-padding tokens trained on, and peak the bf16 (or fp32, per run.mixed_precision) matmul
throughput measured in this same process on square matrices. The data-pipeline overhead compares the real
`vlm.train.train_step` reading token shards through `MixedStream` with the same step fed from batches held in
memory (the same batches, so shapes and FLOPs are equal); blocks of the two alternate to share the machine's
noise. Without --shards, shards with random codes and shapes-world captions are written to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from selftok.data import shards as token_shards
from selftok.runtime.config import load_config
from vlm.model import count_matmul_params
from vlm.train import TrainConfig, setup, train_step

log = logging.getLogger("bench_vlm_train")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """Best sustained FLOP/s of (n x n) @ (n x n) matmuls over ~`seconds`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def synthetic_shards(directory: Path, n: int, K: int, codebook_size: int, seed: int = 0) -> Path:
    """Random codes with shapes-world captions (the model's FLOPs do not depend on what the codes mean)."""
    from selftok import shapes
    rng = np.random.default_rng(seed)
    captions = [[ex.caption] for ex in shapes.iter_examples("train", seed=seed, n=n, size=32)]
    codes = rng.integers(0, codebook_size, (n, K), dtype=np.int64).astype(np.uint16)
    table = token_shards.token_table([f"bench{i}" for i in range(n)], codes, captions)
    name = token_shards.shard_file_name(0, 0)
    directory.mkdir(parents=True, exist_ok=True)
    token_shards.write_table_atomic(table, directory / name)
    token_shards.ShardManifest(K=K, codebook_size=codebook_size, tokenizer={"checkpoint_sha256": "benchmark"},
                               source="synthetic", counts={"written": n, "rejected": 0},
                               shards=[name]).save(directory)
    return directory


class MemoryStream:
    """Replays micro-batches held in memory: the synthetic side of the overhead comparison."""

    def __init__(self, batches: list) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def timed_steps(state, steps: int) -> tuple[float, float]:
    """(seconds, non-padding tokens) of `steps` optimizer steps."""
    tokens, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        m = train_step(state)
        tokens += m["tokens_per_s"] * m["step_time_s"]
    if state.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/vlm_shapes.yaml")
    p.add_argument("--shards", default=None, help="token shards (default: synthetic, in a temp folder)")
    p.add_argument("--K", type=int, default=64, help="tokens per image of the synthetic shards")
    p.add_argument("--codebook", type=int, default=1024, help="codebook size of the synthetic shards")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side and block")
    p.add_argument("--blocks", type=int, default=4, help="alternating real / in-memory blocks")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="run-config overrides, e.g. optim.micro_batch=16")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    shards = args.shards or str(synthetic_shards(Path(tmp.name) / "shards", 4096, args.K, args.codebook))
    cfg = load_config(TrainConfig, args.config, [*args.overrides, f"data.shards={shards}",
                                                 f"run.out_dir={tmp.name}/run", f"optim.max_steps={10 ** 6}",
                                                 "run.checkpoint_every=1000000", "optim.warmup_steps=10"])
    state = setup(cfg)
    device = state.accelerator.device
    dtype = torch.bfloat16 if cfg.run.mixed_precision == "bf16" else torch.float32
    model = state.accelerator.unwrap_model(state.model)
    n_params = count_matmul_params(model)
    timed_steps(state, args.warmup)
    cached = [state.stream.next_batch() for _ in range(cfg.optim.grad_accum * args.steps)]
    real_stream, memory = state.stream, MemoryStream(cached)
    totals = {"real": [0.0, 0.0], "memory": [0.0, 0.0]}
    for block in range(args.blocks):  # alternate which side goes first
        sides = (("real", real_stream), ("memory", memory))
        for side, stream in sides if block % 2 == 0 else sides[::-1]:
            state.stream = stream
            dt, tokens = timed_steps(state, args.steps)
            totals[side][0] += dt
            totals[side][1] += tokens
    state.stream = real_stream
    peak = matmul_peak(device, dtype, args.matmul_n)
    tps = {side: tok / dt for side, (dt, tok) in totals.items()}
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "precision": cfg.run.mixed_precision,
        "matmul_params_M": n_params / 1e6, "micro_batch": cfg.optim.micro_batch, "max_len": cfg.data.max_len,
        "tokens_per_s": tps["real"], "tokens_per_s_in_memory": tps["memory"],
        "peak_matmul_tflops": peak / 1e12, "mfu": 6 * n_params * tps["real"] / peak,
        "mfu_in_memory": 6 * n_params * tps["memory"] / peak,
        "data_overhead": tps["memory"] / tps["real"] - 1,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    state.accelerator.end_training()
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
