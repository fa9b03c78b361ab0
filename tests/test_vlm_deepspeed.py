"""DeepSpeed ZeRO-2 (and ZeRO-3, marked slow) on CPU through `accelerate launch` with the gloo backend.

2 processes x 2 rows reproduce 1 process x 4 rows: same global batch, loss normalised by the global count of
loss tokens. fp32 on both sides; tolerance 1e-5 relative (measured: identical to all printed digits)."""
from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM
from vlm_testutil import launch, one_thread, step_losses, tiny_llama_overrides, write_shards  # noqa: F401

from vlm.train import main
from vlm.vocab import Vocabulary

TOL = 1e-5


def run_args(shards, out, micro, *extra):
    return [f"data.shards={shards}", f"run.out_dir={out}", "data.max_len=40", f"optim.micro_batch={micro}",
            "optim.max_steps=2", "optim.warmup_steps=1", "run.mixed_precision=no", *tiny_llama_overrides(),
            *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    shards = write_shards(root / "shards")
    main(run_args(shards, root / "single", 4))
    return shards, root, step_losses(root / "single")


def check(run_dir, single, proc):
    assert "DEEPSPEED, 2 process(es)" in proc.stderr + proc.stdout
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2]
    for step in (1, 2):
        assert abs(losses[step] - single[step]) <= TOL * abs(single[step]), (step, losses[step], single[step])
    assert (run_dir / "checkpoints" / "step_00000002" / "pytorch_model").is_dir()  # DeepSpeed's own state
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.get_input_embeddings().weight.shape[0] == Vocabulary.load(run_dir / "final").model_vocab_size


def test_zero2_matches_single_process(reference):
    shards, root, single = reference
    check(root / "zero2", single, launch("zero2.yaml", run_args(shards, root / "zero2", 2)))


@pytest.mark.slow
def test_zero3_matches_single_process(reference):
    shards, root, single = reference
    check(root / "zero3", single, launch("zero3.yaml", run_args(shards, root / "zero3", 2)))
