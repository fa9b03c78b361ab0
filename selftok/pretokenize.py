"""Pre-tokenize an image (or image–text) dataset into uint16 token shards in AR order (docs/pretokenize.md).

    python -m selftok.pretokenize --config configs/pretokenize_shapes.yaml [key.sub=value ...]
    torchrun --nproc_per_node 8 -m selftok.pretokenize --config ...      # or: accelerate launch -m ...
    python -m selftok.pretokenize inspect DIR [--tokenizer CKPT_DIR] [--n 16] [--out grid.png]

Inputs are split into shards of `output.shard_size` consecutive inputs (shard s = inputs s·S … s·S+S−1, a
pure function of the input order), and shard s goes to rank s mod world_size. Each rank writes its shards
atomically (`selftok.data.shards.write_shard`); a shard is done once its progress record exists. Re-running the
same command skips finished shards and redoes the rest, so an interrupted job (even SIGKILL, even with a
different number of processes) completes with every input exactly once. A folder holding a manifest of a
different job (tokenizer weights or config, source, transform, shard plan) is refused. The last step (rank 0)
writes the complete manifest: counts, rejects in shard order, duplicate ids.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from selftok.data.shards import (
    ORDER_AR,
    ShardError,
    ShardManifest,
    ar_to_encoder_order,
    codes_to_uint16,
    encoder_to_ar_order,
    open_token_shards,
    read_records,
    read_tokens,
    remove_stale_files,
    token_table,
    write_shard,
)
from selftok.data.sources import DataConfig, ImageBatch, ImageSource, make_loader
from selftok.loaders.official import load_tokenizer
from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.cli import entry_point, parse_run_config, run_parser, setup_logging
from selftok.runtime.config import config_diff, to_dict
from selftok.runtime.io import state_dict_sha256
from selftok.runtime.runs import finish_distributed

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizerSourceConfig:
    """Which tokenizer encodes the images: a project checkpoint directory, or an official checkpoint."""

    path: str | None = None
    """Directory written by `SelftokTokenizer.save_pretrained` (model.safetensors + config.yaml)."""
    official: str | None = None
    """Or an official ``tokenizer_*_ckpt.pth`` / ``renderer_*_ckpt.pth``."""
    official_yaml: str | None = None
    """The official YAML of that checkpoint (optional: the released structure is inferred without it)."""
    vae_path: str | None = None
    """Local diffusers SD3 VAE directory (tokenizers in SD3-VAE latent space)."""

    def __post_init__(self) -> None:
        if self.path is not None and self.official is not None:
            raise ValueError("give tokenizer.path or tokenizer.official, not both")


@dataclasses.dataclass
class OutputConfig:
    dir: str = ""
    """Output folder for manifest.json, shard-*.parquet and progress/."""
    shard_size: int = 4096
    """Inputs per shard (the unit of work, of atomic writing and of resume)."""
    compression: str = "zstd"
    """Parquet compression codec (zstd, snappy, none, …)."""

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"output.shard_size must be positive, got {self.shard_size}")


@dataclasses.dataclass
class PretokenizeRunConfig:
    """How the job runs (section ``run``): batching, data workers, encoding precision, progress bar."""

    batch_size: int = 64
    """Images per encoder forward (batches never straddle two shards)."""
    num_workers: int = 4
    """DataLoader worker processes for reading, decoding and transforms (0 = in the main process)."""
    mixed_precision: Literal["bf16", "no"] = "no"
    """bf16 runs the encoder (and VAE) under bfloat16 autocast; the codebook lookup stays fp32. Codes may
    differ from fp32 (``no``) for inputs near a tie; the precision is part of the job identity (the manifest's
    ``transform.precision``: ``bf16`` or ``fp32``)."""
    progress: bool = True
    """tqdm progress bar (images/s) on the main process."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"precision": "run.mixed_precision"}

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("run.batch_size must be >= 1 and run.num_workers >= 0")


@dataclasses.dataclass
class PretokenizeConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tokenizer: TokenizerSourceConfig = dataclasses.field(default_factory=TokenizerSourceConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    run: PretokenizeRunConfig = dataclasses.field(default_factory=PretokenizeRunConfig)

    def __post_init__(self) -> None:
        if not self.output.dir:
            raise ValueError("output.dir is required")


# ------------------------------------------------------------------------------------------------ tokenizer
def tokenizer_from(cfg: TokenizerSourceConfig) -> SelftokTokenizer:
    if cfg.path is None and cfg.official is None:
        raise ValueError("no tokenizer: set tokenizer.path (a save_pretrained directory) or tokenizer.official")
    return load_tokenizer(cfg.path or cfg.official, cfg.official_yaml, cfg.vae_path)


def vae_sha256(path: str | None) -> str | None:
    """sha256 over the weight files of a local diffusers VAE directory (None when there is none)."""
    if path is None:
        return None
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def describe_tokenizer(tok: SelftokTokenizer) -> dict[str, Any]:
    """The manifest's ``tokenizer`` entry: weight hash and full config (paths are not part of it)."""
    config = to_dict(tok.cfg)
    config["latent"].pop("path", None)  # where the VAE lives is not what it is
    vae = vae_sha256(tok.cfg.latent.path) if tok.cfg.latent.kind == "sd3_vae" else None
    return {"checkpoint_sha256": state_dict_sha256(tok), "vae_sha256": vae, "config": config}


# ------------------------------------------------------------------------------------------------ the job
def job_manifest(cfg: PretokenizeConfig, tok: SelftokTokenizer, source: ImageSource,
                 tokenizer_info: dict[str, Any]) -> ShardManifest:
    """The manifest of the job before any shard exists (complete = False)."""
    n, size = len(source), cfg.output.shard_size
    return ShardManifest(
        K=tok.K, codebook_size=tok.codebook_size, order=ORDER_AR, tokenizer=tokenizer_info,
        image_size=cfg.data.transform.image_size,
        transform={**cfg.data.transform.describe(), "precision": manifest_precision(cfg.run.mixed_precision)},
        source=source.describe(),
        counts={"written": 0, "rejected": 0}, rejects=[], shards=[], complete=False,
        plan={"num_inputs": n, "shard_size": size, "num_shards": -(-n // size)},
        extra={"provenance": {"tokenizer": dataclasses.asdict(cfg.tokenizer), "data_path": cfg.data.path}})


def check_output_dir(out: Path, header: ShardManifest) -> None:
    """Refuse an output folder that holds a manifest of a different job (clear message naming the keys)."""
    if not (out / "manifest.json").is_file():
        leftovers = list(out.glob("shard-*.parquet")) if out.is_dir() else []
        if leftovers:
            raise ShardError(f"{out} holds {len(leftovers)} shard file(s) but no manifest; refusing to mix. "
                             "Use a new output directory.")
        return
    old = ShardManifest.load(out)
    diffs = config_diff(old.identity(), header.identity())
    if diffs:
        shown = "; ".join(d if len(d) < 300 else d[:300] + "…" for d in diffs[:8])
        raise ShardError(f"{out} holds token shards of a different job (another tokenizer, source, transform or "
                         f"shard plan); refusing to mix. Differences (existing -> requested): {shown}. "
                         "Use a new output directory, or the same tokenizer and settings to resume.")


def shard_ranges(num_inputs: int, shard_size: int, shards: list[int]) -> dict[int, range]:
    return {s: range(s * shard_size, min(num_inputs, (s + 1) * shard_size)) for s in shards}


def batch_plan(ranges: dict[int, range], batch_size: int) -> list[list[int]]:
    """Batches of input indices in shard order; a batch never spans two shards."""
    return [list(r[i:i + batch_size]) for r in ranges.values() for i in range(0, len(r), batch_size)]


@dataclasses.dataclass
class PendingShard:
    expected: int
    seen: int = 0
    ids: list[str] = dataclasses.field(default_factory=list)
    tokens: list[np.ndarray] = dataclasses.field(default_factory=list)
    captions: list[list[str]] = dataclasses.field(default_factory=list)
    meta: list[str | None] = dataclasses.field(default_factory=list)
    rejects: list[dict[str, str]] = dataclasses.field(default_factory=list)


def manifest_precision(mixed_precision: str) -> str:
    """The manifest's name of the encoding precision (``fp32`` | ``bf16``) for ``run.mixed_precision``."""
    return "bf16" if mixed_precision == "bf16" else "fp32"


def encode_batch(tok: SelftokTokenizer, batch: ImageBatch, device: torch.device,
                 mixed_precision: str) -> np.ndarray:
    """Kept images of a batch → (B, K) uint16 codes in AR order."""
    if len(batch) == 0:
        return np.zeros((0, tok.K), np.uint16)
    images = batch.to_images(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        codes = tok.encode(images)
    return codes_to_uint16(encoder_to_ar_order(codes), tok.codebook_size)


def tokenize_shards(cfg: PretokenizeConfig, tok: SelftokTokenizer, source: ImageSource, out: Path,
                    shards: list[int], fingerprint: str, rank: int, device: torch.device, main: bool) -> int:
    """Encode and write `shards` (global indices) of this rank; returns the number of inputs processed."""
    ranges = shard_ranges(len(source), cfg.output.shard_size, shards)
    plan = batch_plan(ranges, cfg.run.batch_size)
    pending = {s: PendingShard(expected=len(r)) for s, r in ranges.items()}
    total = sum(len(r) for r in ranges.values())
    loader = make_loader(source, num_workers=cfg.run.num_workers, batch_sampler=plan)
    bar = tqdm(total=total, unit="img", desc=f"pretokenize rank {rank}", disable=not (main and cfg.run.progress),
               dynamic_ncols=True, smoothing=0.1)
    rejected = 0
    for batch in loader:
        first = batch.indices[0] if batch.indices else batch.rejects[0].index
        s = first // cfg.output.shard_size
        shard = pending[s]
        tokens = encode_batch(tok, batch, device, cfg.run.mixed_precision)
        shard.ids += batch.ids
        shard.tokens.append(tokens)
        shard.captions += batch.captions
        shard.meta += batch.meta
        shard.rejects += [{"source_id": r.source_id, "reason": r.reason} for r in batch.rejects]
        shard.seen += len(batch) + len(batch.rejects)
        rejected += len(batch.rejects)
        if shard.seen == shard.expected:
            table = token_table(shard.ids, np.concatenate(shard.tokens), shard.captions, shard.meta)
            write_shard(out, rank, s, table, shard.rejects, fingerprint, cfg.output.compression)
            del pending[s]
        bar.update(len(batch) + len(batch.rejects))
        bar.set_postfix(rejected=rejected, refresh=False)
    bar.close()
    if pending:
        raise RuntimeError(f"rank {rank}: shards {sorted(pending)} did not receive all their inputs")
    return total


def finalize_manifest(out: Path, header: ShardManifest, max_duplicate_examples: int = 100) -> ShardManifest:
    """Gather the progress records into the final manifest (complete when every shard is done)."""
    records = read_records(out, header.fingerprint())
    num_shards = header.plan["num_shards"]
    done = [records[s] for s in range(num_shards) if s in records]
    manifest = dataclasses.replace(header, complete=len(done) == num_shards)
    manifest.shards = [r.file for r in done if r.file is not None]
    manifest.rejects = [x for r in done for x in r.rejects]
    manifest.counts = {"written": sum(r.written for r in done), "rejected": len(manifest.rejects)}
    counts = collections.Counter(i for name in manifest.shards
                                 for i in pq.read_table(out / name, columns=["id"]).column("id").to_pylist())
    duplicated = [i for i, c in counts.items() if c > 1]
    manifest.duplicate_ids = {"count": len(duplicated), "examples": duplicated[:max_duplicate_examples]}
    if manifest.complete:
        total = manifest.counts["written"] + manifest.counts["rejected"]
        if total != header.plan["num_inputs"]:
            raise ShardError(f"{out}: {total} inputs accounted for, expected {header.plan['num_inputs']}")
    manifest.save(out)
    return manifest


def process_state():
    """accelerate's PartialState; on machines without CUDA (or with ACCELERATE_USE_CPU=1) several processes
    form a CPU (gloo) group. Refuses a launch whose processes would each believe they are alone."""
    import os

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise RuntimeError(f"launched with WORLD_SIZE={launched} but accelerate set up {state.num_processes} "
                           "process(es); set ACCELERATE_USE_CPU=1 for CPU runs (docs/pretokenize.md)")
    return state


def barrier(state) -> None:
    """All processes meet. A plain barrier: accelerate's passes device_ids, which breaks gloo (CPU) groups on
    hosts with fewer GPUs than processes."""
    if state.use_distributed:
        torch.distributed.barrier()


def pretokenize(cfg: PretokenizeConfig, tokenizer: SelftokTokenizer | None = None) -> ShardManifest | None:
    """Run (or resume) the job on this process's rank; returns the final manifest on rank 0, else None."""
    state = process_state()
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    if tokenizer is None:
        tok = tokenizer_from(cfg.tokenizer)
        tokenizer_info = describe_tokenizer(tok)
        tok.decoder, tok.renderer = None, None  # only the encoder and the codebook are needed to encode
    else:
        tok, tokenizer_info = tokenizer, describe_tokenizer(tokenizer)
    tok = tok.eval().to(state.device)
    if cfg.data.transform.image_size != tok.cfg.image_size:
        log.warning("data.transform.image_size %d differs from the tokenizer's image_size %d",
                    cfg.data.transform.image_size, tok.cfg.image_size)
    if state.local_process_index != 0:  # the first process of each node fills the datasets cache first
        barrier(state)
    source = ImageSource(cfg.data)
    if state.local_process_index == 0:
        barrier(state)
    out = Path(cfg.output.dir)
    header = job_manifest(cfg, tok, source, tokenizer_info)
    check_output_dir(out, header)
    barrier(state)
    if main and not (out / "manifest.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        header.save(out)
    barrier(state)
    done = read_records(out, header.fingerprint())
    mine = [s for s in range(header.plan["num_shards"]) if s % world == rank and s not in done]
    remove_stale_files(out, mine)
    log.info("rank %d/%d: %d shards to write (%d of %d already done), %d inputs in all", rank, world, len(mine),
             len(done), header.plan["num_shards"], header.plan["num_inputs"])
    start = time.perf_counter()
    n = tokenize_shards(cfg, tok, source, out, mine, header.fingerprint(), rank, state.device, main)
    elapsed = time.perf_counter() - start
    log.info("rank %d: %d inputs in %.1f s (%.1f images/s)", rank, n, elapsed, n / max(elapsed, 1e-9))
    barrier(state)
    manifest = finalize_manifest(out, header) if main else None
    if manifest is not None:
        log.info("%s: %d written, %d rejected, %d shard files, complete=%s", out, manifest.counts["written"],
                 manifest.counts["rejected"], len(manifest.shards), manifest.complete)
    barrier(state)
    return manifest


# ------------------------------------------------------------------------------------------------ inspect
def inspect(directory: str, tokenizer: SelftokTokenizer | None = None, n: int = 16, out: str | None = None,
            steps: int = 25, seed: int = 0) -> dict[str, Any]:
    """Manifest summary; with a tokenizer, decode the first `n` rows (tokens flipped back to encoder order)
    into a PNG grid (renderer if present, else `steps` diffusion steps)."""
    from PIL import Image


    manifest, ds = open_token_shards(directory, allow_incomplete=True, in_memory=True)
    reasons = collections.Counter(r["reason"].split(":", 1)[0] for r in manifest.rejects)
    summary = {"dir": str(directory), "complete": manifest.complete, "K": manifest.K,
               "codebook_size": manifest.codebook_size, "order": manifest.order, "image_size": manifest.image_size,
               "rows": len(ds), "counts": manifest.counts, "rejects_by_reason": dict(reasons),
               "duplicate_ids": manifest.duplicate_ids.get("count", 0), "shards": len(manifest.shards),
               "tokenizer_sha256": manifest.tokenizer.get("checkpoint_sha256"),
               "source": manifest.source, "first_rows": [
                   {"id": ds[i]["id"], "captions": ds[i]["captions"]} for i in range(min(3, len(ds)))]}
    if tokenizer is not None and out is not None and len(ds):
        tok_sha = state_dict_sha256(tokenizer)
        if tok_sha != manifest.tokenizer.get("checkpoint_sha256"):
            log.warning("the tokenizer given to inspect is not the one that wrote these shards")
        rows = min(n, len(ds))
        codes = torch.from_numpy(ar_to_encoder_order(read_tokens(ds, np.arange(rows)).astype(np.int64)))
        with torch.no_grad():
            if tokenizer.renderer is not None:
                images = tokenizer.render(codes)
            else:
                images = tokenizer.decode(codes, steps=steps, generator=torch.Generator().manual_seed(seed))
        cols = int(np.ceil(np.sqrt(rows)))
        grid = torch.ones(3, (rows + cols - 1) // cols * images.shape[-2], cols * images.shape[-1])
        for i, image in enumerate(images.float().clamp(0, 1)):
            r, c = divmod(i, cols)
            grid[:, r * image.shape[-2]:(r + 1) * image.shape[-2], c * image.shape[-1]:(c + 1) * image.shape[-1]] = image
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(out)
        summary["grid"] = out
    return summary


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m selftok.pretokenize inspect",
                                     description="Summarise a token-shard folder and decode samples to a grid.")
    parser.add_argument("dir")
    parser.add_argument("--tokenizer", default=None, help="checkpoint dir (save_pretrained) to decode with")
    parser.add_argument("--official", default=None, help="or an official checkpoint (.pth)")
    parser.add_argument("--official-yaml", default=None)
    parser.add_argument("--vae-path", default=None)
    parser.add_argument("--n", type=int, default=16, help="rows to decode")
    parser.add_argument("--steps", type=int, default=25, help="diffusion steps when there is no renderer")
    parser.add_argument("--out", default=None, help="PNG grid path (default DIR/inspect.png when decoding)")
    args = parser.parse_args(argv)
    setup_logging()
    tok = None
    if args.tokenizer or args.official:
        tok = tokenizer_from(TokenizerSourceConfig(args.tokenizer, args.official, args.official_yaml, args.vae_path))
    out = args.out or (str(Path(args.dir) / "inspect.png") if tok is not None else None)
    summary = inspect(args.dir, tok, args.n, out, args.steps)
    sys.stdout.write(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        return inspect_main(argv[1:])
    parser = run_parser("python -m selftok.pretokenize", "Pre-tokenize images into uint16 AR-order token shards.")
    cfg, _ = parse_run_config(PretokenizeConfig, parser, argv)
    state = process_state()
    setup_logging(state.is_main_process)
    manifest = pretokenize(cfg)
    finish_distributed()  # clean exit (docs/contracts.md, command-line scheme)
    return 0 if manifest is None or manifest.complete else 1


cli = entry_point(main)
if __name__ == "__main__":
    cli()
