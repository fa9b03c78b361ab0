"""Helpers for the vlm tests: tiny token shards, a tiny tokenizer, a tiny Llama config."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from selftok.data import shards

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
CAPTIONS = tuple(f"a {c} {s}" for c in COLORS for s in SHAPES) + tuple(
    f"a {c} {s} left of a {c2} {s2}" for c in COLORS[:2] for s in SHAPES for c2 in COLORS[2:] for s2 in SHAPES[:2])


def write_shards(directory: Path, n: int = 48, K: int = 8, codebook_size: int = 40, seed: int = 0,
                 order: str = "ar", n_files: int = 2) -> Path:
    """Token shards written with selftok.data.shards; codes are a function of the caption so a model can learn them.
    Every 11th image has no caption."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    per = -(-n // n_files)
    for f in range(n_files):
        rows = range(f * per, min(n, (f + 1) * per))
        caps = [CAPTIONS[int(rng.integers(len(CAPTIONS)))] for _ in rows]
        tokens = np.stack([(np.arange(K) * 7 + zlib.crc32(c.encode())) % codebook_size for c in caps])
        table = shards.token_table([f"s{i:05d}" for i in rows], tokens.astype(np.uint16),
                                   [[c] if i % 11 else [] for i, c in zip(rows, caps)])
        names.append(shards.shard_file_name(0, f))
        shards.write_table_atomic(table, directory / names[-1])
    shards.ShardManifest(K=K, codebook_size=codebook_size, order=order, tokenizer={"checkpoint_sha256": "test"},
                         image_size=32, source="vlm tests", counts={"written": n, "rejected": 0},
                         shards=names).save(directory)
    return directory


def tiny_llama_overrides() -> list[str]:
    return ["model.llama.hidden_size=32", "model.llama.num_layers=2", "model.llama.num_heads=4",
            "model.llama.num_kv_heads=2", "model.llama.intermediate_size=64",
            "model.llama.max_position_embeddings=64"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones (shared 2-core machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(accelerate_config: str, args: list[str], processes: int = 2, timeout: int = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch -m vlm.train` on CPU with `processes` ranks (one thread each)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "configs" / "accelerate" / accelerate_config), "--num_processes", str(processes),
           "--main_process_port", str(free_port()), "-m", "vlm.train", *args]
    full_env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a resumed run re-logs the steps after its checkpoint (last wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out
