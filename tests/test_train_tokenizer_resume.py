"""A run killed with SIGKILL (in stage 0, in stage 1 and again in stage 2) and resumed with the same command
ends with weights bitwise identical to an uninterrupted run of the same length (CPU). The run has a learned
autoencoder (stage 0) and a shape net between stages 0 and 1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tokenizer_smoke.yaml"
OVERRIDES = ["stage1.steps=24", "stage2.steps=12", "run.checkpoint_every=4", "run.log_every=4",
             "run.num_threads=1", "eval.num_images=0", "run.tensorboard=false", "data.shapes.n=64",
             "stage1.batch_size=8", "stage2.batch_size=8",
             "model.latent.kind=autoencoder", "model.latent.factor=4", "model.latent.autoencoder={block_out_channels: [8, 16, 32]}",
             "stage0.steps=12", "stage0.batch_size=8", "stage0.normalisation_images=32",
             "shape_net.steps=6", "shape_net.images=32", "shape_net.batch_size=8",
             "stage1.renderer_weight=1", "stage1.shape_weight=1", "stage2.shape_weight=1"]


def command(out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "selftok.train", "--config", str(SMOKE), f"run.out_dir={out_dir}", *OVERRIDES]


def run_to_end(out_dir: Path) -> None:
    subprocess.run(command(out_dir), check=True, cwd=ROOT, capture_output=True, timeout=300)


def kill_after(out_dir: Path, marker: Path, timeout: float = 240) -> None:
    """Start the run and SIGKILL it as soon as `marker` exists (a complete checkpoint mid-stage)."""
    proc = subprocess.Popen(command(out_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run finished before {marker} appeared (exit {proc.returncode})")
            if time.time() > deadline:
                pytest.fail(f"{marker} did not appear within {timeout}s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.timeout(600)
def test_sigkill_and_resume_gives_identical_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_to_end(full)
    kill_after(killed, killed / "stage0" / "checkpoints" / "step_00000008" / "meta.json")
    assert not (killed / "stage0" / "model").exists()  # killed mid stage 0
    kill_after(killed, killed / "stage1" / "checkpoints" / "step_00000008" / "meta.json")
    assert not (killed / "stage1" / "model").exists()  # killed mid stage 1
    kill_after(killed, killed / "stage2" / "checkpoints" / "step_00000004" / "meta.json")
    assert not (killed / "stage2" / "model").exists()  # killed mid stage 2
    run_to_end(killed)
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                      and bool((a[k] == b[k]).all()))]
    assert not different, f"tensors differ after resume: {different[:10]}"
    # the resumed run really trained: its weights differ from the stage-1 export in the renderer, and the
    # autoencoder from a fresh one
    s1 = load_file(str(killed / "stage1" / "model" / "model.safetensors"))
    assert not bool((s1["renderer.final_layer.linear.weight"] == b["renderer.final_layer.linear.weight"]).all())
    assert float(b["latents.latent_std"].min()) != 1.0
    assert load_file(str(full / "shape_net" / "model.safetensors")).keys()


def test_resume_with_another_autoencoder_is_refused(tmp_path):
    out = tmp_path / "run"
    kill_after(out, out / "stage0" / "checkpoints" / "step_00000004" / "meta.json")
    other = command(out) + ["model.latent.autoencoder={block_out_channels: [16, 16, 32], norm_num_groups: 8}"]
    res = subprocess.run(other, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "block_out_channels" in res.stderr and "model.latent.autoencoder" in res.stderr
