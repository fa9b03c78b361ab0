"""DDP on CPU through `accelerate launch`: 2 processes reproduce the single-process first steps.

Both runs see the same global batch (1 process x 4 rows vs 2 processes x 2 rows, the same rows: the stream
builds the global micro-batch on every rank) and normalise the loss by the global loss-token count, so the
losses agree to fp32 round-off. Tolerance: 1e-5 relative (measured: identical to all printed digits)."""
from __future__ import annotations

import pytest
from vlm_testutil import launch, one_thread, step_losses, tiny_llama_overrides, write_shards  # noqa: F401

from vlm.train import main

TOL = 1e-5


def run_args(shards, out, micro):
    return [f"data.shards={shards}", f"run.out_dir={out}", "data.max_len=40", f"optim.micro_batch={micro}",
            "optim.max_steps=2", "optim.warmup_steps=1", "run.mixed_precision=no", *tiny_llama_overrides()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    shards = write_shards(root / "shards")
    main(run_args(shards, root / "single", micro=4))
    return shards, root, step_losses(root / "single")


def test_ddp_two_processes_match_single_process(reference):
    shards, root, single = reference
    proc = launch("ddp.yaml", run_args(shards, root / "ddp", micro=2), env={"ACCELERATE_USE_CPU": "1"})
    assert "MULTI_CPU, 2 process(es)" in proc.stderr + proc.stdout
    ddp = step_losses(root / "ddp")
    assert sorted(ddp) == [1, 2]
    for step in (1, 2):  # step 2 also checks that the first update was the same
        assert abs(ddp[step] - single[step]) <= TOL * abs(single[step]), (step, ddp[step], single[step])
