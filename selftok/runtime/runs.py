"""Run directories: atomic checkpoints, resume discovery, config pinning and loss guards.

Layout of a run directory::

    run_dir/config.yaml                 the config the run was started with (a resume must match it)
    run_dir/checkpoints/step_00000100/  accelerate state (model, optimizer, scheduler, RNG, custom objects)
    run_dir/tb/                         TensorBoard logs

A checkpoint is written to ``step_XXXXXXXX.tmp`` and renamed when complete, so a run killed at any moment
leaves only complete checkpoints behind; ``latest_checkpoint`` ignores leftovers.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from selftok.runtime.config import ConfigError, config_diff
from selftok.runtime.io import replace_dir, write_atomic

log = logging.getLogger(__name__)


class Progress:
    """A run's counters, saved in every accelerate checkpoint (``Accelerator.register_for_checkpointing``):
    optimizer steps done, and samples dropped so far for a non-finite reward (rl.train; 0 elsewhere)."""

    def __init__(self) -> None:
        self.step = 0
        self.dropped = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # vlm.train's checkpoints before the one Progress class have no "dropped"
        self.step, self.dropped = int(state["step"]), int(state.get("dropped", 0))


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is left untouched."""


def pin_run_config(run_dir: str | Path, cfg: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    """Write ``config.yaml`` for a new run, or refuse to resume a run started with a different config.

    `ignore` lists dotted key prefixes allowed to differ (e.g. the step budget of a continued run)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if path.exists():
        old = yaml.safe_load(path.read_text()) or {}
        diffs = [d for d in config_diff(old, cfg) if not d.startswith(ignore)] if ignore else config_diff(old, cfg)
        if diffs:
            raise ConfigError(
                f"{run_dir} holds a run with a different config; refusing to resume. Differences "
                f"(saved -> requested): {'; '.join(diffs)}. Use a new output directory or the same config.")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(cfg, sort_keys=False))


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".tmp") and (p / "meta.json").exists())
    return done[-1] if done else None


def checkpoint_step(path: str | Path) -> int:
    return int(json.loads((Path(path) / "meta.json").read_text())["step"])


def save_checkpoint(accelerator, run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Save the accelerate state atomically as checkpoint `step`; keep the newest `keep` checkpoints.

    Must be called on every process (DeepSpeed shards its state across ranks)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        replace_dir(tmp, final)
        old = sorted(p for p in final.parent.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def check_finite(loss: float, step: int) -> None:
    """Stop with a clear message when the loss is NaN or inf."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; stopping. The last good checkpoint is left intact — lower the "
            f"learning rate or check the data, then re-run the same command to resume from it.")


def finish_distributed() -> None:
    """Barrier and tear-down of the process group at the end of a job (without it, CPU ranks sometimes
    abort at exit). A no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
