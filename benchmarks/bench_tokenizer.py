"""Throughput of the official-size Selftok tokenizer (256 px, K = 512, random weights) on this machine.

    python benchmarks/bench_tokenizer.py [--out bench.json] [--batches 1 8] [--dtypes fp32 bf16] [--threads N] \
        [--override decoder.depth=2 ...]   # overrides shrink the model for a smoke run

Measures, in one run: a matmul probe (this machine's fp32 / bf16 GEMM peak), then images/s for
* encode: SD3 latent (16×32×32) → 512 codes (encoder + codebook lookup; the VAE is not included);
* decode: one velocity evaluation of the diffusion decoder at several visible-token counts; the 50-step
  time is EXTRAPOLATED from them (a quadratic fit in the number of visible tokens, summed over the official
  50-step schedule) — the per-step cost falls from ~1.1 to ~0.4 TFLOP as tokens become invisible;
* render: one renderer pass (latent output; the VAE is not included);
at batch 1 and 8, in fp32 and bf16 (weights cast once, bf16 autocast, codebook lookup in fp32), with
FLOPs counted by torch's FlopCounterMode on a meta-device twin and the achieved fraction of the probe's
peak, plus peak resident memory per phase. The tokenizer (encoder + decoder, 2.17 B parameters, ~9 GiB
fp32) is built once; the renderer is built after the decoder is freed.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from selftok.model.presets import load_tokenizer_config
from selftok.model.renderer import Renderer
from selftok.model.tokenizer import SelftokTokenizer

log = logging.getLogger("bench_tokenizer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_gib() -> float:
    """Peak resident set size of this process since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(fn, *args, repeats: int = 1) -> float:
    """Median wall time in seconds of `repeats` calls ``fn(*args)`` (no warm-up: the big calls run once)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of an n×n×n GEMM in `dtype` (best of repeated calls for ~`seconds`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def count_flops(fn, *args) -> float:
    """FLOPs of ``fn(*args)`` (call it on meta tensors: nothing is computed)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def to_meta(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to("meta") for t in tensors]


def build_random(make):
    """Build a module on the meta device, allocate it on the CPU and fill it with random values (one pass over
    the 2 B parameters instead of a default init followed by a re-randomisation)."""
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.normal_(0, t.shape[-1] ** -0.5 if t.dim() > 1 else 0.2)
    return module.eval()


def meta_twin(cfg):
    with torch.device("meta"):
        model = SelftokTokenizer(cfg)
    return model.to("meta").requires_grad_(False)


def bench_encoder_decoder(cfg, args, results: dict, peaks: dict) -> None:
    reset_peak_rss()
    t0 = time.perf_counter()
    tok = build_random(lambda: SelftokTokenizer(cfg))
    log.info("built encoder + decoder (%.2f B parameters) in %.0f s", sum(p.numel() for p in tok.parameters()) / 1e9,
             time.perf_counter() - t0)
    peaks["build_tokenizer_fp32"] = peak_rss_gib()
    twin = meta_twin(cfg)
    with torch.no_grad():
        twin_mods = twin.decoder.token_modulations()
    C, L, K = cfg.latent.channels, cfg.latent_size, cfg.schedule.K
    grid = tok.schedule.sampler_grid(50)
    visible_points = sorted({K, int(grid.last_visible[30]) + 1, int(grid.last_visible[-1]) + 1}, reverse=True)
    for name in args.dtypes:
        dtype = DTYPES[name]
        if dtype != torch.float32:
            tok.cast_for_inference(dtype)
        reset_peak_rss()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), torch.no_grad():
            mods = tok.decoder.token_modulations()
            for B in args.batches:
                lat = torch.randn(B, C, L, L)
                tok.encode_latents(lat[:1])  # warm-up
                sec = timed(tok.encode_latents, lat, repeats=3)
                flops = count_flops(twin.encode_latents, *to_meta(lat))
                results.append({"call": "encode", "dtype": name, "batch": B, "seconds": sec,
                                "images_per_s": B / sec, "tflop": flops / 1e12})
                log.info("encode %s B=%d: %.3f s", name, B, sec)
                step = {}
                for k in visible_points:
                    v = torch.randn(B, k, cfg.quantizer.vector_dim, dtype=dtype)
                    x, t = torch.randn(B, C, L, L), torch.full((B,), 0.5)
                    step[k] = timed(tok.decoder, x.to(dtype), t, v, None, mods)
                    flops = count_flops(twin.decoder, *to_meta(x, t, v), None, twin_mods)
                    results.append({"call": "decode_step", "dtype": name, "batch": B, "visible": k,
                                    "seconds": step[k], "tflop": flops / 1e12})
                    log.info("decoder step %s B=%d visible=%d: %.2f s", name, B, k, step[k])
                ks = np.array(visible_points, dtype=float)
                coef = np.polyfit(ks, [step[k] for k in visible_points], deg=min(2, len(ks) - 1))
                total = float(sum(np.polyval(coef, int(k) + 1) for k in grid.last_visible))
                results.append({"call": "decode_50_steps_EXTRAPOLATED", "dtype": name, "batch": B,
                                "seconds": total, "images_per_s": B / total})
        peaks[f"encode_decode_{name}"] = peak_rss_gib()


def bench_renderer(cfg, rcfg, args, results: dict, peaks: dict) -> None:
    reset_peak_rss()
    K, C, L = cfg.schedule.K, cfg.latent.channels, cfg.latent_size
    ren = build_random(lambda: Renderer(rcfg, K, C, cfg.quantizer.vector_dim, L))
    peaks["build_renderer_fp32"] = peak_rss_gib()
    with torch.device("meta"):
        twin = Renderer(rcfg, K, C, cfg.quantizer.vector_dim, L)
    twin = twin.to("meta").requires_grad_(False)
    for name in args.dtypes:
        dtype = DTYPES[name]
        ren.to(dtype)
        reset_peak_rss()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), torch.no_grad():
            for B in args.batches:
                v = torch.randn(B, K, cfg.quantizer.vector_dim, dtype=dtype)
                sec = timed(ren, v)
                flops = count_flops(twin, *to_meta(v))
                results.append({"call": "render", "dtype": name, "batch": B, "seconds": sec,
                                "images_per_s": B / sec, "tflop": flops / 1e12})
                log.info("render %s B=%d: %.2f s", name, B, sec)
        peaks[f"render_{name}"] = peak_rss_gib()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_tokenizer.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's); on a shared machine 1 thread avoids oversubscription")
    parser.add_argument("--override", nargs="*", default=[], help="tokenizer config overrides (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    peak = {name: matmul_peak(DTYPES[name]) for name in args.dtypes}
    log.info("matmul peak (GFLOP/s, %d threads): %s", torch.get_num_threads(), peak)
    cfg = load_tokenizer_config("selftok-512", overrides=args.override)
    rcfg = load_tokenizer_config("selftok-renderer-512",
                                 overrides=[o.replace("decoder.", "renderer.") for o in args.override]).renderer
    results, peaks = [], {}
    bench_encoder_decoder(cfg, args, results, peaks)
    gc.collect()  # the tokenizer (~9 GiB fp32) is gone before the renderer is built
    bench_renderer(cfg, rcfg, args, results, peaks)
    peak_after = {name: matmul_peak(DTYPES[name], seconds=1.5) for name in args.dtypes}
    for r in results:
        if "tflop" in r:
            r["fraction_of_peak"] = r["tflop"] * 1e3 / r["seconds"] / max(peak[r["dtype"]], peak_after[r["dtype"]])
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "matmul_peak_gflops": peak,
              "matmul_peak_gflops_after": peak_after, "peak_rss_gib": peaks, "overrides": args.override,
              "load_average_before_after": [load_before, os.getloadavg()], "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    for r in results:
        print(f"{r['call']:30s} {r['dtype']:5s} B={r['batch']} {('k=' + str(r['visible'])) if 'visible' in r else '':6s}"
              f" {r['seconds']:9.3f} s  {r.get('images_per_s', float('nan')):8.4f} img/s  "
              f"{r.get('fraction_of_peak', float('nan')):.0%} of peak")
    print("peak RSS (GiB):", {k: round(v, 2) for k, v in peaks.items()})
    return report


if __name__ == "__main__":
    main()
