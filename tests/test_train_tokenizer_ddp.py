"""Two CPU processes (torchrun + ACCELERATE_USE_CPU=1) train together; the codebook (a buffer updated by
EMA, k-means and re-seeding outside autograd) and the weights stay identical across ranks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tokenizer_smoke.yaml"

SCRIPT = r'''
import json, sys
import torch, torch.distributed as dist
from selftok.runtime.cli import exit_process
from selftok.runtime.config import load_config
from selftok.runtime.runs import finish_distributed
from selftok.train import TrainConfig, train
cfg = load_config(TrainConfig, sys.argv[1], sys.argv[3:])
ctx = train(cfg)
tok = ctx.tok
cb = tok.quantizer.codebook
parts = {"codebook": torch.cat([cb.embed.flatten(), cb.cluster_size.flatten(), cb.embed_avg.flatten(),
                                cb.timestep_p_over_c.flatten()]),
         "weights": torch.cat([p.detach().flatten() for p in tok.parameters()])}
result = {"world": dist.get_world_size(), "initted": float(cb.initted), "steps": float(tok.quantizer.steps)}
for name, v in parts.items():
    gathered = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, v)
    result[name + "_equal"] = all(torch.equal(gathered[0], g) for g in gathered[1:])
if dist.get_rank() == 0:
    open(sys.argv[2], "w").write(json.dumps(result))
finish_distributed()
exit_process(0)  # not interpreter finalisation: it can abort a gloo rank (see exit_process)
'''


@pytest.mark.timeout(300)
def test_two_cpu_processes_keep_the_codebook_identical(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29631", str(script), str(SMOKE), str(out),
           f"run.out_dir={tmp_path / 'run'}", "stage1.steps=8", "stage2.steps=2", "run.num_threads=1",
           "eval.num_images=0", "run.tensorboard=false", "stage1.batch_size=8", "stage2.batch_size=8",
           "stage1.continuous_steps=2", "stage1.ramp_steps=2", "run.checkpoint_every=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert result["initted"] == 1.0 and result["steps"] > 0   # k-means ran and the EMA path was exercised
    assert result["codebook_equal"], "codebook buffers differ across ranks"
    assert result["weights_equal"], "weights differ across ranks"
