"""Training throughput of the tokenizer stages, the fraction of the machine's matmul peak they reach, and each
stage's share of a run's training time.

    python benchmarks/bench_train_tokenizer.py [--config configs/tokenizer_shapes_full.yaml] [--steps 20]
        [--threads N] [--device cpu|cuda] [--compile] [--out result.json] [overrides, e.g. run.attention=default]

All numbers come from the same run: first the bf16 and fp32 matmul peaks (large square matmuls), then
`--steps` timed optimizer steps of stage 0 (the learned autoencoder, on random images; it runs in fp32, see
`selftok.latents`), stage 1 (encoder + quantizer + diffusion decoder, + the joint renderer and its shape term
when configured) and stage 2 (renderer, frozen encoder) on random latents with the config's shapes and batch
sizes, after `--warmup` untimed steps. FLOPs per step are counted with ``torch.utils.flop_counter`` (forward
+ backward matmuls, convolutions, attention), so ``fraction_of_peak = FLOPs/step ÷ seconds/step ÷ peak`` of
the dtype the stage computes in. ``share_of_training_time`` = a stage's seconds/step × its configured steps,
over the sum for all stages (evaluation and the shape net's fit excluded). On a GPU the peak memory is
reported as well.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.config import load_config
from selftok.training import objectives
from selftok.training.shape_net import ShapeNet
from selftok.train import STAGES, TrainConfig, attention_kernel, step_generator, uses_math_attention
from selftok.training.stages import Stage0Objective, Stage1Objective, Stage2Objective, set_stage_modes

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 2048,
                repeats: int = 10) -> float:
    """Achieved matmul FLOP/s on square matrices of `dtype` (the machine's practical peak)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(cfg: TrainConfig, tok: SelftokTokenizer, stage: str, device: torch.device, attention: str):
    """A closure running one full optimizer step of `stage` on random latents (`attention`: as `run.attention`)."""
    scfg = getattr(cfg, stage)
    set_stage_modes(tok, stage, stage == "stage1" and scfg.renderer_weight > 0)  # as selftok.train does
    B, C, L = scfg.batch_size, cfg.model.latent.channels, cfg.model.latent_size
    latents = torch.randn(B, C, L, L, device=device).clamp(-1, 1)
    images = torch.rand(B, 3, cfg.model.image_size, cfg.model.image_size, device=device)
    shape_net = (ShapeNet.from_config(cfg.shape_net, C, L).to(device).requires_grad_(False)
                 if cfg.shape_net.steps else None)
    if stage == "stage0":
        module = Stage0Objective(tok, scfg.mse_weight, scfg.l1_weight)
    elif stage == "stage1":
        module = Stage1Objective(tok, 0, scfg.renderer_weight, shape_net, scfg.shape_weight)
    else:
        module = Stage2Objective(tok)
    params = [p for p in tok.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    counter = {"step": 0}

    def step() -> None:
        gen = step_generator(0, stage, counter["step"], 0)
        with torch.autocast(device.type, torch.bfloat16), attention_kernel(attention, device):
            if stage == "stage0":
                loss = module(images)[0]
            elif stage == "stage1":
                fb = objectives.draw_flow_batch(tok.schedule.last_visible_at, tuple(latents.shape), tok.K, gen,
                                                scfg.time_sampling, cfg.model.flow.shift, scfg.condition_dropout)
                loss = module(latents, objectives.FlowBatch(*(x.to(device) for x in fb)), 1.0)[0]
            else:
                loss = objectives.renderer_loss(module(latents), latents, mse_weight=scfg.mse_weight,
                                                l1_weight=scfg.l1_weight, shape_net=shape_net,
                                                shape_weight=scfg.shape_weight)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter["step"] += 1

    return step, B


def measure(step, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as fc:
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    return {"seconds_per_step": seconds, "images_per_second": batch / seconds, "batch_size": batch,
            "flops_per_step": fc.get_total_flops(), "achieved_flops": fc.get_total_flops() / seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tokenizer_shapes_full.yaml"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder, decoder and renderer")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. stage1.batch_size=8")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    torch.manual_seed(0)
    tok = SelftokTokenizer(cfg.model).to(device)
    for part in (tok.encoder, tok.decoder, tok.renderer):
        if part is not None:
            part.gradient_checkpointing = args.gradient_checkpointing
            if args.compile:
                part.compile()
    peaks = {"bf16": matmul_peak(device), "fp32": matmul_peak(device, torch.float32)}
    result = {"config": args.config, "overrides": args.overrides, "device": str(device),
              "threads": torch.get_num_threads(), "bf16_matmul_peak_flops": peaks["bf16"],
              "fp32_matmul_peak_flops": peaks["fp32"],
              "params": {n: sum(q.numel() for q in getattr(tok, n).parameters())
                         for n in ("latents", "encoder", "quantizer", "decoder", "renderer")
                         if isinstance(getattr(tok, n), torch.nn.Module)}}
    for stage in STAGES:
        if not getattr(cfg, stage).steps:
            continue
        precision = "fp32" if stage == "stage0" else "bf16"
        peak = peaks[precision]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step, batch = make_step(cfg, tok, stage, device, cfg.run.attention)
        r = measure(step, batch, args.steps, args.warmup, device)
        r["fraction_of_peak"] = r["achieved_flops"] / peak
        if device.type == "cuda":
            r["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        result[stage] = r
        print(f"{stage}: {r['images_per_second']:.1f} images/s ({r['seconds_per_step']:.3f} s/step, batch {batch}), "
              f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * r['fraction_of_peak']:.1f}% of the "
              f"{peak / 1e9:.0f} GFLOP/s {precision} matmul peak")
        if stage != "stage0" and uses_math_attention(cfg.run.attention, device):
            # the same step with torch's default attention kernel, measured in this run: the kernel choice's gain
            base = measure(*make_step(cfg, tok, stage, device, "default"), args.steps, args.warmup, device)
            r["speedup_vs_default_attention"] = base["seconds_per_step"] / r["seconds_per_step"]
            print(f"{stage}: {r['speedup_vs_default_attention']:.2f}x the images/s of torch's default attention "
                  f"kernel ({base['images_per_second']:.1f} images/s)")
    timed = [s for s in STAGES if s in result]
    total = sum(result[s]["seconds_per_step"] * getattr(cfg, s).steps for s in timed)
    for s in timed:
        result[s]["share_of_training_time"] = result[s]["seconds_per_step"] * getattr(cfg, s).steps / total
    print("share of the training time: " + ", ".join(f"{s} {100 * result[s]['share_of_training_time']:.0f}%"
                                                      for s in timed) + f" (of {total / 60:.1f} min)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
