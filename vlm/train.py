"""Train the VLM on mixed text->image / image->text sequences with accelerate.

    python -m vlm.train --config configs/vlm_shapes.yaml [key.sub=value ...]
    accelerate launch --config_file configs/accelerate/zero2.yaml -m vlm.train --config ...

One shape: `setup(cfg) -> TrainState`, `train_step(state) -> metrics`, `save_final(state)`, `main(argv)`.
A run directory holds config.yaml, tokenizer/ and vocab.json (fixed at the first start; a resume with a
different vocabulary is refused), checkpoints/ (accelerate state + the data position), tb/, metrics.jsonl and,
at the end, final/ (save_pretrained model + tokenizer + vocab.json, loadable with AutoModelForCausalLM).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import set_seed
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from selftok.data.shards import open_token_shards
from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime import runs
from selftok.runtime.cli import entry_point, parse_run_config, run_parser, setup_logging
from selftok.runtime.config import to_dict
from selftok.runtime.grid import image_grid, to_pil_images
from selftok.runtime.launch import make_accelerator, scheduled_lr
from vlm.data import TASKS, DataConfig, MixedStream, TokenSource
from vlm.loss import backward_scale, next_token_loss_sums, unigram_entropy
from vlm.model import ModelConfig, build_model, export_model
from vlm.sampler import generate_images
from vlm.sampling import SamplingPolicy
from vlm.text_tokenizer import load_text_tokenizer, train_text_tokenizer
from vlm.vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizerConfig:
    path: str | None = None
    """Local base tokenizer folder. None: the base model's folder, or (no base model) a sentencepiece
    tokenizer trained on the shards' captions."""
    vocab_size: int = 512
    """Upper bound on the pieces of a tokenizer trained on the captions."""


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    max_steps: int = 1000
    micro_batch: int = 32
    """Rows per process per forward pass."""
    grad_accum: int = 1
    clip: float = 1.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"precision": "run.mixed_precision", "seed": "run.seed"}

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError("max_steps, micro_batch and grad_accum must be >= 1")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps], got {self.warmup_steps}")


@dataclasses.dataclass
class SampleGridConfig:
    every: int = 0
    """Write a grid of generated images every this many steps (0 = never)."""
    image_tokenizer: str | None = None
    """SelftokTokenizer folder whose renderer decodes the sampled codes (the tokenizer of the shards)."""
    prompts: tuple[str, ...] = ("a photo of a red circle", "a photo of two squares",
                                "a photo of a blue triangle left of a yellow diamond", "a photo of a green square")
    images_per_prompt: int = 2
    cfg_scale: float = 3.0

    def __post_init__(self) -> None:
        if self.every > 0 and not self.image_tokenizer:
            raise ValueError("samples.every > 0 needs samples.image_tokenizer (a Selftok tokenizer folder)")


@dataclasses.dataclass
class VLMRunConfig:
    """The run-level keys (the same names as `selftok.train`'s and `rl.train`'s section ``run``)."""

    out_dir: str = "runs/vlm"
    """The run directory."""
    seed: int = 0
    """Model initialisation seed."""
    mixed_precision: Literal["bf16", "no"] = "bf16"
    """bf16 autocast (fp32 master weights; DeepSpeed: its bf16 mode) or none (fp32). Never fp16 on CPU
    (docs/vlm.md)."""
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = False
    """torch.compile the model (inductor) through accelerate; the first steps pay the compile time."""


@dataclasses.dataclass
class TrainConfig:
    run: VLMRunConfig = dataclasses.field(default_factory=VLMRunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    samples: SampleGridConfig = dataclasses.field(default_factory=SampleGridConfig)

    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "output_dir": "run.out_dir", "checkpoint_every": "run.checkpoint_every",
        "keep_checkpoints": "run.keep_checkpoints", "log_every": "run.log_every", "compile": "run.compile"}


RESUME_MAY_DIFFER = ("run.checkpoint_every", "run.keep_checkpoints", "run.log_every", "samples")


@dataclasses.dataclass
class TrainState:
    cfg: TrainConfig
    accelerator: Accelerator
    model: Any
    optimizer: Any
    stream: MixedStream
    progress: runs.Progress
    vocab: Vocabulary
    tokenizer: PreTrainedTokenizerBase
    run_dir: Path


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to base_lr, cosine decay to base_lr * min_ratio
    over the `total - warmup` steps after it."""
    return scheduled_lr(base_lr, step, warmup, max(1, total - warmup), "cosine", min_ratio)


def open_shards(path: str) -> tuple[Any, Any]:
    """(manifest, datasets.Dataset) of a token-shard directory."""
    if not path:
        raise ValueError("data.shards is empty: set it to a token-shard directory (python -m selftok.pretokenize)")
    return open_token_shards(path)


def setup_vocabulary(cfg: TrainConfig, accelerator: Accelerator, run_dir: Path, manifest: Any,
                     dataset: Any) -> tuple[PreTrainedTokenizerBase, Vocabulary]:
    """The run's tokenizer and vocabulary: fixed at the first start, checked (never rebuilt) on resume."""
    tok_dir = run_dir / "tokenizer"
    if accelerator.is_main_process and not (tok_dir / "tokenizer_config.json").exists():
        source = cfg.tokenizer.path or cfg.model.base_model
        if source is not None:
            tokenizer = load_text_tokenizer(source)
        else:
            captions = (c for row in dataset["captions"] for c in (row or []))
            tokenizer = train_text_tokenizer(captions, run_dir / "text_tokenizer", cfg.tokenizer.vocab_size)
        vocab = Vocabulary.from_manifest(tokenizer, manifest)
        tokenizer.save_pretrained(str(tok_dir))
        vocab.save(run_dir)
    accelerator.wait_for_everyone()
    tokenizer = load_text_tokenizer(tok_dir)
    saved = Vocabulary.load(run_dir)
    Vocabulary.from_manifest(tokenizer, manifest).check_same(saved, what=f"run in {run_dir}")
    saved.check_manifest(manifest)
    return tokenizer, saved


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def setup(cfg: TrainConfig) -> TrainState:
    run_dir = Path(cfg.run.out_dir)
    accelerator = make_accelerator(run_dir, cfg.run.mixed_precision, cfg.optim.grad_accum,
                                   compile=cfg.run.compile)
    setup_logging(accelerator.is_main_process)
    log.info("accelerate: %s, %d process(es), device %s, precision %s", accelerator.distributed_type,
             accelerator.num_processes, accelerator.device, cfg.run.mixed_precision)
    if accelerator.is_main_process:
        runs.pin_run_config(run_dir, to_dict(cfg), ignore=RESUME_MAY_DIFFER)
    accelerator.wait_for_everyone()
    manifest, dataset = open_shards(cfg.data.shards)
    tokenizer, vocab = setup_vocabulary(cfg, accelerator, run_dir, manifest, dataset)
    set_seed(cfg.run.seed)
    model = build_model(cfg.model, vocab)
    optimizer = build_optimizer(model, cfg.optim)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.optim.micro_batch
        ds["gradient_clipping"] = cfg.optim.clip
    model, optimizer = accelerator.prepare(model, optimizer)
    stream = MixedStream(TokenSource(dataset), vocab, tokenizer, cfg.data, cfg.optim.micro_batch,
                         accelerator.process_index, accelerator.num_processes)
    progress = runs.Progress()
    accelerator.register_for_checkpointing(stream)
    accelerator.register_for_checkpointing(progress)
    ckpt = runs.latest_checkpoint(run_dir)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        log.info("resumed from %s (step %d, data position %d)", ckpt, progress.step, stream.position)
    if accelerator.is_main_process and not (run_dir / "baselines.json").exists():
        probe = stream.samples(range(min(len(stream.source), 4096)))  # pure function: no effect on the stream
        baselines = {f"unigram_{k}": v for k, v in unigram_entropy(probe).items()}
        (run_dir / "baselines.json").write_text(json.dumps(baselines, indent=2) + "\n")
        log.info("unigram baselines (nats/token): %s", baselines)
    accelerator.init_trackers("vlm")
    return TrainState(cfg, accelerator, model, optimizer, stream, progress, vocab, tokenizer, run_dir)


def train_step(state: TrainState) -> dict[str, float]:
    """One optimizer step over grad_accum micro-batches; returns global metrics."""
    cfg, acc, model = state.cfg.optim, state.accelerator, state.model
    lr = cosine_lr(state.progress.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    batches = [state.stream.next_batch() for _ in range(cfg.grad_accum)]
    scale = backward_scale(sum(n for _, n in batches), acc.num_processes, cfg.grad_accum)
    sums = torch.zeros(2, len(TASKS), device=acc.device)  # stays on the device: one sync per step
    tokens = sum(int((batch["task"] >= 0).sum()) for batch, _ in batches)
    grad_norm = None
    model.train()
    cuda = acc.device.type == "cuda"
    for batch, _ in batches:
        batch = {k: (v.pin_memory() if cuda else v).to(acc.device, non_blocking=cuda) for k, v in batch.items()}
        with acc.accumulate(model):
            out = model(**{k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch},
                        use_cache=False)
            loss = next_token_loss_sums(out.logits, batch["labels"], batch["task"])
            acc.backward(loss.total * scale)
            if acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.clip)
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([loss.per_task, loss.counts])
    totals = torch.cat([sums.flatten(), torch.tensor([float(tokens)], device=acc.device)])
    sums, tokens = acc.reduce(totals, "sum").cpu().split([2 * len(TASKS), 1])
    per_task, counts = sums.view(2, len(TASKS))
    dt = time.perf_counter() - t0
    metrics = {"loss": float(per_task.sum() / counts.sum().clamp(min=1)), "lr": lr,
               "tokens_per_s": float(tokens) / dt, "step_time_s": dt}
    metrics.update({f"loss_{t}": float(per_task[i] / counts[i]) for i, t in enumerate(TASKS) if counts[i] > 0})
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    state.progress.step += 1
    return metrics


@torch.no_grad()
def write_sample_grid(state: TrainState, step: int) -> Path | None:
    """Main process: sample images for `samples.prompts` (CFG, seeds 0..n-1) and save a PNG grid."""
    cfg, acc = state.cfg.samples, state.accelerator
    if acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3:
        log.warning("sample grids are skipped under ZeRO-3 (parameters are sharded across ranks)")
        return None
    model = acc.unwrap_model(state.model)
    image_tokenizer = SelftokTokenizer.from_pretrained(cfg.image_tokenizer, device=str(acc.device)).eval()
    prompts = [p for p in cfg.prompts for _ in range(cfg.images_per_prompt)]
    model.eval()
    with acc.autocast():
        _, images = generate_images(model, state.vocab, state.tokenizer, image_tokenizer, prompts,
                                    SamplingPolicy(cfg_scale=cfg.cfg_scale), seeds=list(range(len(prompts))))
    model.train()
    path = state.run_dir / "samples" / f"step_{step:08d}.png"
    path.parent.mkdir(exist_ok=True)
    image_grid(to_pil_images(images), ncols=cfg.images_per_prompt * 2).save(path)
    log.info("sample grid -> %s", path)
    return path


def save_final(state: TrainState) -> Path:
    """save_pretrained (adapters merged) + tokenizer + vocab.json into run_dir/final; the adapter alone in
    final/adapter for LoRA runs."""
    acc = state.accelerator
    final = state.run_dir / "final"
    acc.wait_for_everyone()
    full_state = acc.get_state_dict(state.model)  # gathers ZeRO-3 shards; every rank must call it
    # torch.compile prefixes every key with "_orig_mod."; from_pretrained would silently drop such keys
    if acc.is_main_process:  # under ZeRO-3 only the main process receives the gathered state
        full_state = {k.replace("_orig_mod.", ""): v for k, v in full_state.items()}
        model = acc.unwrap_model(state.model)
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper may survive unwrap_model
        if isinstance(model, PeftModel):
            model.save_pretrained(str(final / "adapter"), state_dict=full_state)
            model = export_model(model)
            model.save_pretrained(str(final))
        else:
            model = export_model(model)
            expected = set(model.state_dict())
            if set(full_state) != expected:
                raise RuntimeError(f"final state dict keys differ from the model's: missing "
                                   f"{sorted(expected - set(full_state))[:5]}, unexpected "
                                   f"{sorted(set(full_state) - expected)[:5]}")
            model.save_pretrained(str(final), state_dict=full_state)
        state.tokenizer.save_pretrained(str(final))
        state.vocab.save(final)
        log.info("saved final model to %s", final)
    acc.wait_for_everyone()
    return final


def run(cfg: TrainConfig) -> Path:
    state = setup(cfg)
    acc, total = state.accelerator, cfg.optim.max_steps
    metrics_file = state.run_dir / "metrics.jsonl"
    bar = tqdm(total=total, initial=state.progress.step, disable=not acc.is_main_process, desc="vlm")
    while state.progress.step < total:
        metrics = train_step(state)
        step = state.progress.step
        runs.check_finite(metrics["loss"], step)
        if acc.is_main_process:
            with metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if step % cfg.run.log_every == 0 or step == total:
            acc.log(metrics, step=step)
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if cfg.samples.every and (step % cfg.samples.every == 0 or step == total) and acc.is_main_process:
            write_sample_grid(state, step)
        if step % cfg.run.checkpoint_every == 0 or step == total:
            runs.save_checkpoint(acc, state.run_dir, step, keep=cfg.run.keep_checkpoints)
    bar.close()
    final = save_final(state)
    acc.end_training()
    runs.finish_distributed()
    return final


def main(argv: list[str] | None = None) -> int:
    """Train per the config (final model in ``run.out_dir/final``); returns the exit status."""
    parser = run_parser("python -m vlm.train", "Train a causal LM on Selftok visual tokens (t2i + i2t).")
    cfg, _ = parse_run_config(TrainConfig, parser, argv)
    run(cfg)
    return 0


cli = entry_point(main)
if __name__ == "__main__":
    cli()
