"""Train a Selftok tokenizer (stage 1) and its one-step renderer (stage 2) with accelerate.

    python -m selftok.train --config configs/tokenizer_shapes.yaml [key.sub=value ...]
    accelerate launch -m selftok.train --config configs/tokenizer_official_512.yaml

With a learned latent space (``model.latent.kind: autoencoder``), stage 0 first trains the autoencoder on
the run's images (pixel MSE + L1) and sets its per-channel latent normalisation; it is then frozen.
Stage 1 trains the encoder, the quantizer (EMA codebook) and the MMDiT diffusion decoder with the
rectified-flow velocity loss; stage 2 freezes encoder and codebook and trains the renderer to predict the
clean latent in one pass (initialised from the stage-1 decoder). A config runs either stage or both in
sequence (``stage1.steps`` / ``stage2.steps``; 0 skips a stage). Run directory::

    out_dir/config.yaml                     the pinned config (a resume with a different one is refused)
    out_dir/stage0/...                      the autoencoder stage (checkpoints/, model/), when there is one
    out_dir/stage1/checkpoints/step_N/      accelerate state: model, optimizer, scheduler, RNG
    out_dir/stage1/model/                   the stage-1 tokenizer (model.safetensors + config.yaml)
    out_dir/stage2/...                      the same for the renderer stage
    out_dir/model/                          the final tokenizer (decoder and/or renderer)
    out_dir/eval/<stage>_step<N>.json|png   held-out metrics and reconstruction grids
    out_dir/tb/                             TensorBoard

Re-running the same command resumes from the newest checkpoint and ends with the same weights (bitwise on
CPU) as an uninterrupted run: every random draw of step N comes from a generator seeded by (seed, N, rank),
and the batch of step N is a pure function of (seed, N).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from selftok.data.sources import DataConfig, collate_samples
from selftok.loaders.official import load_tokenizer
from selftok.loaders.sd3 import load_sd3_image_stream
from selftok.model.layers import explicit_attention
from selftok.model.tokenizer import WEIGHTS_NAME, SelftokTokenizer, TokenizerConfig
from selftok.runtime.cli import entry_point, parse_run_config, run_parser, setup_logging
from selftok.runtime.config import ConfigError, to_dict
from selftok.runtime.io import replace_dir
from selftok.runtime.launch import make_accelerator, scheduled_lr
from selftok.runtime.runs import (
    check_finite,
    checkpoint_step,
    finish_distributed,
    latest_checkpoint,
    pin_run_config,
    save_checkpoint,
)
from selftok.training import objectives
from selftok.training.evaluation import (EvalConfig, HeldOut, encode_heldout, evaluate_autoencoder, evaluate_stage,
                                        last_evaluations)
from selftok.training.perceptual import load_perceptual
from selftok.training.shape_net import ShapeNet, ShapeNetConfig, label_maps, train_shape_net
from selftok.training.stages import (
    OptimConfig,
    Stage0Objective,
    Stage1Objective,
    Stage2Objective,
    renderer_init_from_decoder,
    renderer_matches_decoder,
    set_stage_modes,
    stage0_param_groups,
    stage1_param_groups,
    stage2_param_groups,
)
from selftok.training.stream import CachedSource, DataStream, DataStreamConfig, RejectGuard, build_source

log = logging.getLogger(__name__)

STAGES = ("stage0", "stage1", "stage2")
#: Added to run.seed for each stage's batch order.
STREAM_SEED_OFFSET = {"stage0": 2, "stage1": 0, "stage2": 1}


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class Stage0Config:
    """Stage 0: the learned latent autoencoder (``model.latent.kind: autoencoder``), trained on the run's
    images before stage 1, then frozen. Not in the paper (SD3's VAE is trained elsewhere)."""

    steps: int = 0
    """Optimizer steps; 0 skips the stage (then the autoencoder comes from `init`)."""
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=50, decay="cosine"))
    """`lr` is the autoencoder's."""
    mse_weight: float = 1.0
    """Pixel MSE (on [−1, 1] pixels)."""
    l1_weight: float = 1.0
    """Pixel L1 (sharper edges than MSE alone)."""
    normalisation_images: int = 2048
    """Training images whose latents set the per-channel mean and std after training."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.normalisation_images < 1:
            raise ValueError("stage0.steps must be >= 0, stage0.batch_size and normalisation_images >= 1")


@dataclass
class Stage1Config:
    """Stage 1: encoder + quantizer + diffusion decoder."""

    steps: int = 0
    """Optimizer steps; 0 skips the stage."""
    batch_size: int = 48
    """Images per process per step (official 48/GPU at 256 px)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    condition_dropout: float = 0.1
    """Fraction of samples whose tokens are all hidden (classifier-free training)."""
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """t ~ U(0, 1) (what the official code does) or sigmoid(N(logit_mean, logit_std))."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    continuous_steps: int = 0
    """Steps during which the quantizer is bypassed (official ``continuous``: 2000); the codebook is
    initialised by k-means on the first quantized step, from features that are already image-dependent."""
    ramp_steps: int = 0
    """Then the straight-through offset grows linearly from 0 to 1 over this many steps."""
    renderer_weight: float = 0.0
    """Not in the paper (0 = official): also train the renderer in stage 1, on the same quantized tokens,
    with this weight on its latent MSE. Its one-step regression gives the encoder a direct reconstruction
    signal, which the velocity loss only provides at t ≈ 1; stage 2 then continues from this renderer."""
    shape_weight: float = 0.0
    """Not in the paper: weight of the shape net's perceptual distance (`selftok.training.shape_net`) between the
    joint renderer's prediction and the target latent; needs ``renderer_weight`` and ``shape_net.steps``."""
    shape_start: int = 0
    """The shape term is off for this many steps (the renderer first learns the image under the MSE; from the
    first step the shape net's logits pulled a fresh renderer off the latent manifold), then ramps up."""
    shape_ramp: int = 0
    """Steps of the shape term's linear ramp from 0 to `shape_weight` after `shape_start`."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("stage1.steps must be >= 0 and stage1.batch_size >= 1")
        if not 0 <= self.condition_dropout < 1:
            raise ValueError(f"stage1.condition_dropout must lie in [0, 1), got {self.condition_dropout}")
        if self.renderer_weight < 0:
            raise ValueError(f"stage1.renderer_weight must be >= 0, got {self.renderer_weight}")
        if self.shape_start < 0 or self.shape_ramp < 0:
            raise ValueError("stage1.shape_start and stage1.shape_ramp must be >= 0")


@dataclass
class Stage2Config:
    """Stage 2: the one-step renderer, encoder and codebook frozen."""

    steps: int = 0
    batch_size: int = 48
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, image_lr=1e-4))
    init_from_decoder: bool = True
    """Copy the stage-1 decoder's shared weights (joint blocks, embedders, final layer) into the renderer."""
    mse_weight: float = 1.0
    """Latent MSE."""
    l1_weight: float = 0.0
    """Latent L1 (pulls towards the conditional median: sharper edges than MSE)."""
    gradient_weight: float = 0.0
    """Edge term: L1 between image gradients in pixel space (pixel latents only)."""
    perceptual_weight: float = 0.0
    """Perceptual (LPIPS-style VGG) term in pixel space; needs `perceptual_weights`."""
    perceptual_weights: str | None = None
    """Local VGG16 (+ optional LPIPS linear heads) weights; nothing is downloaded."""
    shape_weight: float = 0.0
    """The shape net's perceptual distance on latents (`selftok.training.shape_net`); needs ``shape_net.steps``."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("stage2.steps must be >= 0 and stage2.batch_size >= 1")
        if self.perceptual_weight and not self.perceptual_weights:
            raise ValueError("stage2.perceptual_weight > 0 needs stage2.perceptual_weights (a local file)")


@dataclass
class InitConfig:
    """Where the weights start from (local paths only)."""

    tokenizer: str | None = None
    """A tokenizer to start from: a `save_pretrained` directory, or an official ``.pth`` checkpoint (then
    `official_yaml` may give its YAML). Stage 2 of the official renderer recipe starts here."""
    official_yaml: str | None = None
    sd3_mmdit: str | None = None
    """SD3-medium ``sd3_medium.safetensors``: initialise the decoder's image stream from it (stage 1)."""
    autoencoder: str | None = None
    """A tokenizer directory (`save_pretrained`, e.g. another run's ``stage0/model``) whose learned
    autoencoder and latent normalisation this run uses; its latent config must equal `model.latent`."""


@dataclass
class RunConfig:
    out_dir: str = "runs/tokenizer"
    seed: int = 0
    mixed_precision: Literal["bf16", "no"] = "bf16"
    """bf16 autocast (fp32 master weights); never fp16 (unusable on CPU, not the official recipe)."""
    cpu: bool = False
    """Force CPU even when a GPU is visible."""
    gradient_checkpointing: bool = False
    num_threads: int | None = None
    """torch intra-op threads (CPU); None = torch's default."""
    log_every: int = 25
    checkpoint_every: int = 500
    """Steps between checkpoints; 0 = only at the end of each stage."""
    keep_checkpoints: int = 2
    compile: bool = False
    """torch.compile the trained module (needs a C++ compiler; on the shapes config with explicit attention
    ≈1.02× stage 1, 1.10× stage 2 on CPU, after a ~20 s compile)."""
    attention: Literal["auto", "math", "default"] = "auto"
    """Training attention kernel: ``math`` = plain matmul + softmax in the compute dtype
    (`selftok.model.layers.explicit_attention`); ``default`` = torch's SDPA choice; ``auto`` = math on CPU, where
    torch's fused flash-attention backward costs ~6× its forward on these short sequences and SDPA's own math
    backend upcasts to fp32, default elsewhere."""
    tensorboard: bool = True


@dataclass
class TrainConfig:
    """A whole tokenizer training run (one YAML file)."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stream: DataStreamConfig = field(default_factory=DataStreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    stage0: Stage0Config = field(default_factory=Stage0Config)
    shape_net: ShapeNetConfig = field(default_factory=ShapeNetConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def __post_init__(self) -> None:
        learned = self.model.latent.kind == "autoencoder"
        if self.stage0.steps and not learned:
            raise ValueError(f"stage0.steps > 0 trains a learned autoencoder, but model.latent.kind is "
                             f"{self.model.latent.kind!r}; set it to autoencoder")
        if learned and not (self.stage0.steps or self.init.autoencoder or self.init.tokenizer):
            raise ValueError("model.latent.kind autoencoder needs stage0.steps > 0 (train it), init.autoencoder "
                             "or init.tokenizer (load it); an untrained autoencoder would be frozen")
        if (self.stage1.shape_weight or self.stage2.shape_weight) and not self.shape_net.steps:
            raise ValueError("stage1/stage2.shape_weight > 0 needs a shape net: set shape_net.steps > 0")
        if self.stage1.shape_weight and not self.stage1.renderer_weight:
            raise ValueError("stage1.shape_weight applies to the joint renderer: set stage1.renderer_weight > 0")
        if self.stage1.steps and self.model.decoder is None:
            raise ValueError("stage1.steps > 0 trains the diffusion decoder, but model.decoder is null")
        if self.stage1.renderer_weight and self.model.renderer is None:
            raise ValueError("stage1.renderer_weight > 0 trains the renderer in stage 1, but model.renderer is null")
        if self.stage2.steps and self.model.renderer is None:
            raise ValueError("stage2.steps > 0 trains the renderer, but model.renderer is null")
        pixel_terms = self.stage2.gradient_weight or self.stage2.perceptual_weight
        if pixel_terms and self.model.latent.kind == "sd3_vae":
            raise ValueError("stage2.gradient_weight / perceptual_weight need pixel or autoencoder latents "
                             "(model.latent.kind); with the SD3 VAE use the latent MSE / L1 terms")
        if self.data.transform.image_size != self.model.image_size:
            raise ValueError(f"data.transform.image_size {self.data.transform.image_size} differs from "
                             f"model.image_size {self.model.image_size}")


# ------------------------------------------------------------------------------------------------ pure helpers
def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier of the base LRs at `step` (0-based) of a `total`-step stage: linear warm-up, then constant /
    cosine / linear decay to `final_lr_fraction` at the last step."""
    decay_steps = total - optim.warmup_steps - 1
    return scheduled_lr(1.0, step, optim.warmup_steps, decay_steps, optim.decay, optim.final_lr_fraction)


def step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    """The generator of every random draw of (stage, step, rank): resuming needs no saved RNG state."""
    key = hashlib.sha256(f"{seed}:{stage}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


# ------------------------------------------------------------------------------------------------ run context
class CheckpointExtras:
    """Run state that is not a module or optimizer, saved in every accelerate checkpoint (the reject guard of
    the current stage)."""

    def __init__(self) -> None:
        self.guard: RejectGuard | None = None

    def state_dict(self) -> dict:
        return {"guard": self.guard.state_dict() if self.guard else None}

    def load_state_dict(self, state: dict) -> None:
        if self.guard is not None and state.get("guard"):
            self.guard.load_state_dict(state["guard"])


@dataclass
class Context:
    cfg: TrainConfig
    accelerator: Accelerator
    tok: SelftokTokenizer
    out_dir: Path
    extras: CheckpointExtras
    held: HeldOut | None = None
    source: torch.utils.data.Dataset | None = None
    perceptual: nn.Module | None = None
    lpips: nn.Module | None = None
    shape_net: ShapeNet | None = None
    latent_cache: Tensor | None = None
    results: dict = field(default_factory=dict)

    @property
    def autocast(self) -> bool:
        return self.cfg.run.mixed_precision == "bf16"


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    return make_accelerator(Path(cfg.run.out_dir), cfg.run.mixed_precision,
                            log_with="tensorboard" if cfg.run.tensorboard else None,
                            logging_dir=Path(cfg.run.out_dir), force_cpu=cfg.run.cpu, handlers=handlers)


def build_tokenizer(cfg: TrainConfig) -> SelftokTokenizer:
    """A fresh tokenizer from `cfg.model`, initialised from `init.tokenizer` / `init.sd3_mmdit` if given."""
    tok = SelftokTokenizer(cfg.model)
    if cfg.init.tokenizer:
        load_initial_tokenizer(tok, cfg.init.tokenizer, cfg.init.official_yaml)
    if cfg.init.autoencoder:
        load_autoencoder(tok, cfg.init.autoencoder)
    if cfg.init.sd3_mmdit:
        if tok.decoder is None:
            raise ConfigError("init.sd3_mmdit initialises the diffusion decoder, but model.decoder is null")
        loaded = load_sd3_image_stream(tok.decoder, cfg.init.sd3_mmdit)
        log.info("initialised %d decoder tensors from SD3 MMDiT %s", len(loaded), cfg.init.sd3_mmdit)
    return tok


def load_initial_tokenizer(tok: SelftokTokenizer, path: str, official_yaml: str | None) -> None:
    """Copy encoder + quantizer (and the decoder / renderer where both have one) from a trained tokenizer;
    every copied part is loaded strictly. A renderer without a source renderer starts from the decoder."""
    src = load_tokenizer(path, official_yaml)
    if tok.cfg.latent.kind == "autoencoder":
        check_same_latents(tok.cfg.latent, src.cfg.latent, path)
    for name in ("latents", "encoder", "quantizer", "decoder", "renderer"):
        mine, theirs = getattr(tok, name), getattr(src, name)
        if isinstance(mine, nn.Module) and isinstance(theirs, nn.Module):
            mine.load_state_dict(theirs.state_dict(), strict=True)
    if tok.renderer is not None and src.renderer is None and src.decoder is not None:
        renderer_init_from_decoder(tok.renderer, src.decoder)
    log.info("initialised from tokenizer %s", path)


def check_same_latents(mine, theirs, source: str) -> None:
    """Raise a ConfigError naming each field where `source`'s latent config differs from this run's."""
    a, b = to_dict(mine), to_dict(theirs)
    diffs = [f"{k}: {source} has {b.get(k)!r}, model.latent has {a.get(k)!r}" for k in a if a.get(k) != b.get(k)]
    if diffs:
        raise ConfigError(f"the autoencoder of {source} does not match this run's model.latent: " + "; ".join(diffs))


def load_autoencoder(tok: SelftokTokenizer, path: str) -> None:
    """Copy the learned autoencoder (weights + latent normalisation) of the tokenizer directory `path`."""
    if not (Path(path) / "config.yaml").is_file():
        raise ConfigError(f"init.autoencoder {path} is not a tokenizer directory (no config.yaml)")
    src = SelftokTokenizer.from_pretrained(path)
    check_same_latents(tok.cfg.latent, src.cfg.latent, path)
    tok.latents.load_state_dict(src.latents.state_dict(), strict=True)
    log.info("autoencoder from %s", path)


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class StageRun:
    name: str
    cfg: Stage0Config | Stage1Config | Stage2Config
    dir: Path
    module: nn.Module
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    stream: DataStream
    start: int


def setup_stage(ctx: Context, name: str) -> StageRun:
    """Freeze/unfreeze, build the optimizer, prepare with accelerate, resume from the newest checkpoint."""
    cfg, acc, tok = ctx.cfg, ctx.accelerator, ctx.tok
    scfg = stage_config(cfg, name)
    stage_dir = ctx.out_dir / name
    joint = cfg.stage1.renderer_weight > 0
    set_stage_modes(tok, name, joint)
    for part in (tok.encoder, tok.decoder, tok.renderer):
        if part is not None:
            part.gradient_checkpointing = cfg.run.gradient_checkpointing
    if name == "stage0":
        module = Stage0Objective(tok, scfg.mse_weight, scfg.l1_weight)
        groups = stage0_param_groups(tok, scfg.optim)
    elif name == "stage1":
        if joint and latest_checkpoint(stage_dir) is None and renderer_matches_decoder(tok):
            renderer_init_from_decoder(tok.renderer, tok.decoder)
        module = Stage1Objective(tok, cfg.run.seed, cfg.stage1.renderer_weight, ctx.shape_net,
                                 cfg.stage1.shape_weight)
        groups = stage1_param_groups(tok, scfg.optim, joint)
    else:
        fresh = latest_checkpoint(stage_dir) is None and not (joint and cfg.stage1.steps)
        if scfg.init_from_decoder and tok.decoder is not None and fresh:
            if not renderer_matches_decoder(tok):
                raise ConfigError("stage2.init_from_decoder needs a renderer with the decoder's width and patch "
                                  "size; set it to false or match model.renderer to model.decoder")
            renderer_init_from_decoder(tok.renderer, tok.decoder)
        module, groups = Stage2Objective(tok), stage2_param_groups(tok, scfg.optim)
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=scfg.optim.betas, eps=scfg.optim.eps,
                                  weight_decay=scfg.optim.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    if cfg.run.compile:
        parts = {"stage0": (tok.latents,), "stage1": (tok.encoder, tok.decoder), "stage2": (tok.encoder, tok.renderer)}
        for part in parts[name]:
            part.compile()
    acc.free_memory()
    module, optimizer = acc.prepare(module, optimizer)
    if ctx.source is None:
        ctx.source = build_source(cfg.data, cfg.stream)
    if name != "stage0":
        build_latent_cache(ctx)
    stream = DataStream(ctx.source, cfg.stream, scfg.batch_size, cfg.run.seed + STREAM_SEED_OFFSET[name],
                        acc.process_index, acc.num_processes)
    ctx.extras.guard = stream.guard
    start = 0
    ckpt = latest_checkpoint(stage_dir)
    if ckpt is not None:
        acc.load_state(str(ckpt))
        start = checkpoint_step(ckpt)
        log.info("%s: resumed from %s (step %d)", name, ckpt, start)
    return StageRun(name, scfg, stage_dir, module, optimizer, base_lrs, stream, start)


def stage_config(cfg: TrainConfig, name: str) -> Stage0Config | Stage1Config | Stage2Config:
    return getattr(cfg, name)


def source_batches(source, n: int, size: int = 256):
    """The first `n` samples of `source` in order, collated `size` at a time (rejects dropped)."""
    for i in range(0, n, size):
        yield collate_samples([source[j] for j in range(i, min(i + size, n))], source.image_size)


def build_latent_cache(ctx: Context) -> None:
    """With a frozen learned autoencoder and a source held in memory, encode every training image once
    (stages 1 and 2 then index the cache instead of running the autoencoder each step)."""
    source = ctx.source
    if not isinstance(ctx.tok.latents, nn.Module) or not isinstance(source, CachedSource) or ctx.latent_cache is not None:
        return
    t0 = time.time()
    ctx.tok.latents.eval()
    cache = None
    with torch.no_grad():
        for batch in source_batches(source, len(source)):
            if not len(batch):
                continue
            z = ctx.tok.latents.encode(batch.to_images(ctx.accelerator.device)).cpu()
            if cache is None:
                cache = torch.zeros(len(source), *z.shape[1:])
            cache[batch.indices] = z
    ctx.latent_cache = cache
    log.info("encoded the %d training images once with the frozen autoencoder (%.1f s)", len(source),
             time.time() - t0)


def batch_latents(ctx: Context, batch, images: Tensor) -> Tensor:
    """The batch's latents: from the cache when there is one, else encoded now."""
    if ctx.latent_cache is not None:
        return ctx.latent_cache[batch.indices].to(images.device)
    with torch.no_grad():
        return ctx.tok.latents.encode(images)


def uses_math_attention(choice: str, device: torch.device) -> bool:
    """Whether training on `device` runs the explicit matmul + softmax attention (see `RunConfig.attention`)."""
    return choice == "math" or (choice == "auto" and device.type == "cpu")


def attention_kernel(choice: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The attention context for a training forward pass (see `RunConfig.attention`)."""
    return explicit_attention() if uses_math_attention(choice, device) else contextlib.nullcontext()


def train_step(ctx: Context, run: StageRun, step: int, batch) -> dict[str, float]:
    """One optimizer step of either stage; returns the scalars to log. Raises NonFiniteLossError on NaN/inf."""
    acc, tok, cfg = ctx.accelerator, ctx.tok, ctx.cfg
    factor = lr_factor(step, run.cfg.steps, run.cfg.optim)
    for group, base in zip(run.optimizer.param_groups, run.base_lrs):
        group["lr"] = base * factor
    images = batch.to_images(acc.device)
    gen = step_generator(cfg.run.seed, run.name, step, acc.process_index)
    out: dict[str, float] = {}
    if run.name != "stage0":
        latents = batch_latents(ctx, batch, images)
    with acc.autocast(), attention_kernel(cfg.run.attention, acc.device):
        if run.name == "stage0":
            loss, terms = run.module(images)
            out.update({f"autoencoder/{k}": v for k, v in terms.items()})
        elif run.name == "stage1":
            fb = objectives.draw_flow_batch(tok.schedule.last_visible_at, tuple(latents.shape), tok.K, gen,
                                            run.cfg.time_sampling, cfg.model.flow.shift, run.cfg.condition_dropout,
                                            run.cfg.logit_mean, run.cfg.logit_std)
            fb = objectives.FlowBatch(*(x.to(acc.device) for x in fb))
            mix = objectives.delayed_ramp(step, run.cfg.continuous_steps, run.cfg.ramp_steps)
            shape = objectives.delayed_ramp(step, run.cfg.shape_start, run.cfg.shape_ramp)
            loss, per_sample, qmetrics = run.module(latents, fb, mix, shape)
            out.update({(k if k.startswith("renderer_") else f"quantizer/{k}"): float(v) for k, v in qmetrics.items()})
            out["dm_mse"] = float(per_sample.mean())
            for key, (total, count) in objectives.bucket_losses(per_sample, fb.t_model, fb.dropped).items():
                out[f"{key}_sum"], out[f"{key}_n"] = total, count
        else:
            pred = run.module(latents)
            needs_pixels = run.cfg.gradient_weight or run.cfg.perceptual_weight
            pix = (lambda z: objectives.pixels_from_latents(z.float(), tok.latents)) if needs_pixels else (lambda z: None)
            loss, terms = objectives.renderer_loss(
                pred, latents, pix(pred), pix(latents), run.cfg.mse_weight, run.cfg.l1_weight,
                run.cfg.gradient_weight, ctx.perceptual, run.cfg.perceptual_weight, ctx.shape_net,
                run.cfg.shape_weight)
            out.update({f"renderer/{k}": v for k, v in terms.items()})
    losses = acc.gather(loss.detach().float().reshape(1))
    check_finite(float(losses.sum()), step)
    acc.backward(loss)
    if run.cfg.optim.grad_clip:
        out["grad_norm"] = float(acc.clip_grad_norm_(run.module.parameters(), run.cfg.optim.grad_clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    out["loss"] = float(losses.mean())
    out["lr_factor"] = factor
    return out


class LogWindow:
    """Accumulates step scalars between log lines (bucket losses pooled as sums and counts)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.t0 = time.time()

    def add(self, scalars: dict[str, float], images: int) -> None:
        self.steps += 1
        self.images += images
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def flush(self, world_size: int) -> dict[str, float]:
        out = {}
        for k, v in self.sums.items():
            if k.endswith("_n"):
                continue
            if k.endswith("_sum"):
                n = self.sums[k[:-4] + "_n"]
                if n:
                    out[k[:-4]] = v / n
            else:
                out[k] = v / max(self.steps, 1)
        seconds = time.time() - self.t0
        out["images_per_second"] = self.images * world_size / max(seconds, 1e-9)
        self.__init__()
        return out


def run_stage(ctx: Context, name: str) -> None:
    """Train one stage to its step budget (resuming if possible), checkpointing, evaluating and exporting."""
    acc = ctx.accelerator
    run = setup_stage(ctx, name)
    total, every = run.cfg.steps, ctx.cfg.run.checkpoint_every
    window = LogWindow()
    t0 = time.time()
    progress = tqdm(total=total, initial=run.start, desc=name, disable=not acc.is_main_process, leave=False,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
    step = run.start
    for step, batch in enumerate(run.stream.batches(run.start, total), start=run.start):
        check_rejects(acc, run.stream.guard)
        scalars = train_step(ctx, run, step, batch)
        window.add(scalars, len(batch))
        progress.update(1)
        done = step + 1
        if done % ctx.cfg.run.log_every == 0 or done == total:
            logged = window.flush(acc.num_processes)
            logged["rejected_inputs"] = run.stream.guard.counter.total
            acc.log({f"{name}/{k}": v for k, v in logged.items()}, step=done)
            log.info("%s step %d/%d: %s", name, done, total, format_scalars(logged))
        if (every and done % every == 0) or done == total:
            save_checkpoint(acc, run.dir, done, keep=ctx.cfg.run.keep_checkpoints)
        if ctx.cfg.eval.every and done % ctx.cfg.eval.every == 0 and done != total:
            evaluate(ctx, name, done)
    progress.close()
    if name == "stage0":
        set_latent_normalisation(ctx)
    ctx.results[f"{name}_train_seconds"] = time.time() - t0
    ctx.results[f"{name}_steps_this_session"] = total - run.start
    ctx.results[f"{name}_inputs_seen"] = run.stream.guard.seen
    ctx.results[f"{name}_inputs_rejected"] = dict(run.stream.guard.counter.by_kind)
    export(ctx, ctx.out_dir / name / "model")
    evaluate(ctx, name, total)


def set_latent_normalisation(ctx: Context) -> None:
    """Per-channel mean and std of the trained autoencoder's latents on the first
    ``stage0.normalisation_images`` training images (every rank computes the same)."""
    tok, source = ctx.tok, ctx.source
    n = min(ctx.cfg.stage0.normalisation_images, len(source))
    tok.latents.eval()
    raw = []
    with torch.no_grad():
        for batch in source_batches(source, n):
            raw.append(tok.latents.raw_encode(batch.to_images(ctx.accelerator.device)))
    tok.latents.set_normalisation(torch.cat(raw))
    log.info("stage0: latent normalisation from %d images: mean %s, std %s", n,
             [round(v, 3) for v in tok.latents.latent_mean.tolist()],
             [round(v, 3) for v in tok.latents.latent_std.tolist()])


def check_rejects(acc, guard: RejectGuard) -> None:
    """Enforce the bad-input threshold on totals over all ranks (every rank stops at the same step)."""
    if acc.num_processes == 1:
        guard.check()
        return
    counts = acc.reduce(torch.tensor([guard.seen, guard.counter.total], device=acc.device), reduction="sum")
    guard.check(int(counts[0]), int(counts[1]))


def evaluate(ctx: Context, name: str, step: int) -> None:
    """Held-out evaluation on the main process (the other ranks wait)."""
    acc = ctx.accelerator
    joint = name == "stage1" and ctx.cfg.stage1.renderer_weight > 0  # stage 1 also trains the renderer
    parts = ("decoder", "renderer") if joint else ("decoder",) if name == "stage1" else ("renderer",)
    if name == "stage0" and acc.is_main_process and ctx.held is not None:
        ctx.results["autoencoder"] = evaluate_autoencoder(ctx.tok, ctx.held, ctx.cfg.eval, ctx.out_dir / "eval",
                                                          f"{name}_step{step}")
    elif acc.is_main_process and ctx.held is not None:
        codes = encode_heldout(ctx.tok, ctx.held, ctx.cfg.eval.batch_size)
        for which in parts:
            tag = f"{name}_step{step}" + ("_renderer" if joint and which == "renderer" else "")
            metrics = evaluate_stage(ctx.tok, ctx.held, codes, ctx.cfg.eval, which, ctx.out_dir / "eval", tag,
                                     autocast=ctx.autocast, lpips=ctx.lpips)
            acc.log({f"{name}/eval_{which}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                    step=step)
            ctx.results[which] = metrics
    set_stage_modes(ctx.tok, name, ctx.cfg.stage1.renderer_weight > 0)
    acc.wait_for_everyone()


def export(ctx: Context, directory: Path) -> None:
    """Write the tokenizer (model.safetensors + config.yaml) atomically: a temporary directory, then rename."""
    acc = ctx.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        ctx.tok.save_pretrained(tmp)
        replace_dir(tmp, directory)
        log.info("saved tokenizer to %s", directory)
    acc.wait_for_everyone()


def format_scalars(scalars: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())


def stage_finished(ctx: Context, name: str) -> bool:
    return (ctx.out_dir / name / "model" / "model.safetensors").exists()


def load_finished_stage(ctx: Context, name: str) -> None:
    """Load a finished stage's exported weights (its trained parts) into the running tokenizer."""
    done = SelftokTokenizer.from_pretrained(ctx.out_dir / name / "model")
    parts = {"stage0": ("latents",), "stage1": ("encoder", "quantizer", "decoder"), "stage2": ("renderer",)}[name]
    if name == "stage1" and ctx.cfg.stage1.renderer_weight:
        parts += ("renderer",)
    for part in parts:
        getattr(ctx.tok, part).load_state_dict(getattr(done, part).state_dict(), strict=True)
    _, files = last_evaluations(ctx.out_dir / "eval").get(name, (0, []))
    for path in (p for p in files if p.suffix == ".json"):
        data = json.loads(path.read_text())
        ctx.results[data.pop("which")] = data
    log.info("%s already finished: loaded %s", name, ctx.out_dir / name / "model")


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> int:
    """Train per the config (the summary goes to ``out_dir/summary.json``); returns the exit status."""
    parser = run_parser("selftok.train", "Train a Selftok tokenizer (stage 1) and renderer (stage 2).")
    cfg, _ = parse_run_config(TrainConfig, parser, argv)
    try:
        train(cfg)
    finally:
        finish_distributed()
    return 0


def train(cfg: TrainConfig) -> Context:
    """Run the configured stages (resuming where a previous run stopped); returns the run context."""
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    acc = build_accelerator(cfg)
    setup_logging(acc.is_main_process)
    for noisy in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out_dir = Path(cfg.run.out_dir)
    if acc.is_main_process:
        pin_run_config(out_dir, to_dict(cfg))
    acc.wait_for_everyone()
    torch.manual_seed(cfg.run.seed)  # model initialisation: identical on every rank
    ctx = Context(cfg, acc, build_tokenizer(cfg).to(acc.device), out_dir, CheckpointExtras())
    acc.register_for_checkpointing(ctx.extras)
    if cfg.eval.num_images and acc.is_main_process:
        ctx.held = HeldOut(cfg.eval)
    setup_losses(ctx)
    if cfg.run.tensorboard:
        acc.init_trackers("tb")
    t0 = time.time()
    try:
        for name in STAGES:
            if stage_config(cfg, name).steps == 0:
                continue
            if name != "stage0" and cfg.shape_net.steps and ctx.shape_net is None:
                prepare_shape_net(ctx)  # before the first stage whose objective uses it (stage 2 alone too)
            if stage_finished(ctx, name):
                load_finished_stage(ctx, name)
            else:
                run_stage(ctx, name)
        export(ctx, out_dir / "model")
    finally:
        for tracker in acc.trackers:  # not acc.end_training(): it would destroy the process group here
            tracker.finish()
    ctx.results["total_seconds_this_session"] = time.time() - t0
    if acc.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps(ctx.results, indent=2))
    return ctx


def prepare_shape_net(ctx: Context) -> None:
    """Train the shape net on the frozen autoencoder's latents of the first ``shape_net.images`` training
    images (main process; saved atomically to ``out_dir/shape_net/``) or load the one a previous session
    saved; every rank then loads the file."""
    acc, cfg, tok = ctx.accelerator, ctx.cfg.shape_net, ctx.tok
    directory = ctx.out_dir / "shape_net"
    if acc.is_main_process and not (directory / WEIGHTS_NAME).exists():
        if ctx.source is None:
            ctx.source = build_source(ctx.cfg.data, ctx.cfg.stream)
        build_latent_cache(ctx)
        n = min(cfg.images, len(ctx.source))
        latents, labels = [], []
        for batch in source_batches(ctx.source, n):
            latents.append(batch_latents(ctx, batch, batch.to_images(acc.device)).cpu())
            labels.append(label_maps(batch.meta, cfg.map_size))
        net, metrics = train_shape_net(cfg, torch.cat(latents), torch.cat(labels), ctx.cfg.run.seed)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(net.state_dict(), str(tmp / WEIGHTS_NAME))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        replace_dir(tmp, directory)
    acc.wait_for_everyone()
    net = ShapeNet.from_config(cfg, tok.cfg.latent.channels, tok.cfg.latent_size)
    net.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
    ctx.shape_net = net.eval().requires_grad_(False).to(acc.device)
    ctx.results["shape_net"] = json.loads((directory / "metrics.json").read_text())


def setup_losses(ctx: Context) -> None:
    """Optional perceptual loss / LPIPS metric from local weights."""
    if ctx.cfg.stage2.perceptual_weight:
        ctx.perceptual = load_perceptual(ctx.cfg.stage2.perceptual_weights).to(ctx.accelerator.device)
    if ctx.cfg.eval.lpips_weights:
        ctx.lpips = load_perceptual(ctx.cfg.eval.lpips_weights).to(ctx.accelerator.device)


cli = entry_point(main)
if __name__ == "__main__":
    cli()
