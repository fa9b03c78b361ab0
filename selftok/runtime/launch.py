"""The one accelerator factory of the stack (selftok.train, vlm.train and rl.train build theirs here), and the
one learning-rate schedule they share (`scheduled_lr`).

On machines without CUDA a multi-process launch needs the gloo backend named explicitly, and FSDP is refused
(accelerate only turns GPU process groups into FSDP). ``cpu=True`` keeps torchrun/DDP copies synchronised on
CPU but silently turns DeepSpeed off, so it is passed only when no DeepSpeed launch is asked for.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

log = logging.getLogger(__name__)


def scheduled_lr(base: float, step: int, warmup_steps: int, decay_steps: int, decay: str = "constant",
                 final_fraction: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up from 0 to `base` over
    `warmup_steps`, then `base` (``decay="constant"`` or `decay_steps` <= 0) or a cosine / linear decay over
    `decay_steps` steps to ``base · final_fraction``, held there afterwards. With ``base=1.0`` it is the
    multiplier of several parameter groups' own base LRs (selftok.train, rl.train)."""
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if decay == "constant" or decay_steps <= 0:
        return base
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if decay == "linear":
        return base * (1.0 - (1.0 - final_fraction) * progress)
    return base * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warn_emulated_bf16(mixed_precision: str, device: torch.device) -> bool:
    """Log a warning (and return True) when bf16 autocast is asked for on a CPU without native bf16 (no
    AVX-512 BF16 / AMX, e.g. AVX2-only AMD EPYC): there bf16 matmuls are emulated, measured ≈ 50× slower
    than fp32 (docs/tokenizer_training.md)."""
    if mixed_precision != "bf16" or device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    log.warning("mixed precision bf16 on a CPU without native bf16 (no AVX-512 BF16/AMX): bf16 matmuls are "
                "emulated here and run far slower than fp32; set the run's mixed precision to 'no'")
    return True


def launched_with(name: str) -> bool:
    """Whether `accelerate launch` asked for ``DEEPSPEED`` / ``FSDP`` (its ``ACCELERATE_USE_*`` variables)."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def make_accelerator(run_dir: Path, mixed_precision: str = "no", gradient_accumulation_steps: int = 1,
                     log_with: str | None = "tensorboard", logging_dir: Path | None = None, compile: bool = False,
                     force_cpu: bool = False, handlers: list | None = None) -> Accelerator:
    """An `Accelerator` for a run writing into `run_dir` (TensorBoard logs in `logging_dir`, default run_dir/tb).

    `mixed_precision`: accelerate's name ("no" | "bf16" | "fp16"); `force_cpu`: run on the CPU even where CUDA
    is available; `handlers`: extra kwargs handlers. Refuses a multi-process launch that accelerate would run
    as unsynchronised single processes."""
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_with("FSDP") and not cuda:
        raise RuntimeError("FSDP through accelerate needs CUDA devices (accelerate only turns GPU process groups "
                           "into FSDP); on CPU use configs/accelerate/ddp.yaml, zero2.yaml or zero3.yaml")
    handlers = list(handlers or []) + ([InitProcessGroupKwargs(backend="gloo")] if world > 1 and not cuda else [])
    accelerator = Accelerator(
        cpu=(force_cpu or not cuda) and not launched_with("DEEPSPEED"), mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps, log_with=log_with,
        dynamo_backend="inductor" if compile else "no",
        project_config=ProjectConfiguration(project_dir=str(run_dir),
                                            logging_dir=str(logging_dir or Path(run_dir) / "tb")),
        kwargs_handlers=handlers)
    if world > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(f"launched with {world} processes but accelerate would run them unsynchronised")
    warn_emulated_bf16(mixed_precision, torch.device("cpu" if force_cpu or not cuda else "cuda"))
    return accelerator
