"""vlm.train end to end on CPU: a tiny run, its final model, SIGKILL + exact resume, refused resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from vlm_testutil import one_thread, step_losses, tiny_llama_overrides, write_shards  # noqa: F401 (autouse fixture)

from selftok.runtime.config import ConfigError, from_dict
from vlm.train import TrainConfig, cosine_lr, main
from vlm.vocab import Vocabulary, VocabularyError

ROOT = Path(__file__).resolve().parents[1]


def args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.out_dir={out}", "data.max_len=40", "optim.micro_batch=4",
            "optim.warmup_steps=2", "optim.lr=3e-3", "run.log_every=1", *tiny_llama_overrides(), *extra]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("vlm_train") / "shards", n=48, K=8, codebook_size=40)


def test_cosine_lr():
    assert cosine_lr(0, 1.0, 4, 20, 0.1) == 0.25 and cosine_lr(3, 1.0, 4, 20, 0.1) == 1.0
    assert cosine_lr(4, 1.0, 4, 20, 0.1) == 1.0 and abs(cosine_lr(12, 1.0, 4, 20, 0.1) - 0.55) < 1e-12
    assert abs(cosine_lr(20, 1.0, 4, 20, 0.1) - 0.1) < 1e-12


def test_tiny_run_learns_and_saves_a_loadable_model(shards, tmp_path):
    run = tmp_path / "run"
    assert main(args(shards, run, "optim.max_steps=60", "optim.lr=1e-2", "run.checkpoint_every=30",
                     "data.packing=true")) == 0
    final = run / "final"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and {"loss_t2i", "loss_i2t", "tokens_per_s", "lr", "grad_norm"} <= set(rows[0])
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert list((run / "tb").rglob("events.out.tfevents*"))
    baselines = json.loads((run / "baselines.json").read_text())
    assert set(baselines) == {"unigram_t2i", "unigram_i2t"}
    for task in ("t2i", "i2t"):  # the end of the curve is below the context-free baseline
        tail = [r[f"loss_{task}"] for r in rows[-10:] if f"loss_{task}" in r]
        assert sum(tail) / len(tail) < 0.9 * baselines[f"unigram_{task}"], (task, tail, baselines)
    vocab = Vocabulary.load(final)
    assert vocab == Vocabulary.load(run) and vocab.K == 8 and vocab.codebook_size == 40
    assert vocab.image_tokenizer_sha256 == "test"  # the shards' tokenizer, which vlm.pipeline then requires
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.get_input_embeddings().weight.shape[0] == vocab.model_vocab_size
    assert tokenizer.convert_tokens_to_ids("<boi>") == vocab.boi_id and len(tokenizer) == vocab.visual_offset
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000030", "step_00000060"]
    assert_final_equals_checkpoint(run, "step_00000060")


def assert_final_equals_checkpoint(run: Path, step: str) -> None:
    """The saved final model holds exactly the trained weights (from_pretrained silently drops unknown keys)."""
    trained = load_file(run / "checkpoints" / step / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    trained = {k.replace("_orig_mod.", ""): v for k, v in trained.items()}
    assert set(loaded) <= set(trained) and all(torch.equal(loaded[k], trained[k]) for k in loaded)


@pytest.mark.slow
def test_compiled_run_saves_the_trained_weights(shards, tmp_path):
    run = tmp_path / "run"
    main(args(shards, run, "optim.max_steps=3", "run.checkpoint_every=3", "run.compile=true"))
    assert_final_equals_checkpoint(run, "step_00000003")


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(shards, tmp_path):
    steps = ["optim.max_steps=16", "run.checkpoint_every=4"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    main(args(shards, ref, *steps))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlm.train", *args(shards, killed, *steps)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000008").exists():  # killed after its second checkpoint
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert max(step_losses(killed)) < 16
    main(args(shards, killed, *steps))
    assert step_losses(killed) == step_losses(ref)  # bit-identical, every step


def test_resume_with_a_different_vocabulary_or_config_is_refused(tmp_path):
    data, run = tmp_path / "shards", tmp_path / "run"
    write_shards(data, n=48, K=8, codebook_size=40)
    main(args(data, run, "optim.max_steps=2"))
    with pytest.raises(ConfigError, match="different config.*optim.lr"):
        main(args(data, run, "optim.max_steps=2", "optim.lr=1e-2"))
    for f in data.iterdir():
        f.unlink()
    write_shards(data, n=48, K=8, codebook_size=48)  # same path, same config, other tokenizer output
    with pytest.raises(VocabularyError, match="different vocabulary.*codebook_size: 40 .saved. != 48"):
        main(args(data, run, "optim.max_steps=2"))


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="data.shards is empty"):
        main([f"run.out_dir={tmp_path / 'r'}", *tiny_llama_overrides()])
    with pytest.raises(ConfigError, match="warmup_steps"):
        from_dict(TrainConfig, {"optim": {"warmup_steps": 10, "max_steps": 5}})


def test_periodic_sample_grids_use_the_renderer(tmp_path):
    from selftok.model.presets import get_preset
    from selftok.model.tokenizer import SelftokTokenizer
    torch.manual_seed(0)
    image_tokenizer = SelftokTokenizer(get_preset("tiny"))  # K = 16, 64 codes, 32 px, with a renderer
    image_tokenizer.save_pretrained(tmp_path / "tok")
    data = write_shards(tmp_path / "shards", n=24, K=image_tokenizer.K, codebook_size=image_tokenizer.codebook_size)
    main(args(data, tmp_path / "run", "optim.max_steps=2", "samples.every=2", "samples.images_per_prompt=1",
              f"samples.image_tokenizer={tmp_path / 'tok'}", "data.max_len=48"))
    from PIL import Image
    grid = Image.open(tmp_path / "run" / "samples" / "step_00000002.png")
    assert grid.size[0] >= 2 * 32 and grid.size[1] >= 2 * 32  # 4 prompts x 1 image, 2 per row
