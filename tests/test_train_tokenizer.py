"""End-to-end tokenizer training on CPU with the smoke config: both stages, outputs, freezing, config pinning,
the NaN guard and the bad-input guard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selftok import train as train_mod
from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.config import ConfigError
from selftok.runtime.runs import NonFiniteLossError, latest_checkpoint
from selftok.training.stream import TooManyRejectsError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "tokenizer_smoke.yaml")
FAST = ["run.num_threads=1", "stage1.batch_size=8", "stage2.batch_size=8", "data.shapes.n=64"]


def run(out_dir: Path, *overrides: str) -> dict:
    assert train_mod.main(["--config", SMOKE, f"run.out_dir={out_dir}", *FAST, *overrides]) == 0
    return json.loads((Path(out_dir) / "summary.json").read_text())


def test_both_stages_train_evaluate_and_export(tmp_path):
    out = tmp_path / "run"
    results = run(out, "stage1.steps=8", "stage2.steps=4", "eval.num_images=8", "eval.decoder_steps=3",
                  "run.checkpoint_every=4")
    for which in ("decoder", "renderer"):
        m = results[which]
        for key in ("psnr", "ssim", "attribute_preservation", "codes_used_fraction", "perplexity",
                    "position_perplexity"):
            assert key in m, (which, key)
        assert 0 <= m["attribute_preservation"] <= 1 and 0 < m["codes_used_fraction"] <= 1
    assert json.loads((out / "summary.json").read_text())["renderer"]["psnr"] == results["renderer"]["psnr"]
    assert (out / "eval" / "stage1_step8.png").exists() and (out / "eval" / "stage2_step4.png").exists()
    assert list((out / "tb").rglob("events.out.tfevents*")), "no TensorBoard event file"
    tok = SelftokTokenizer.from_pretrained(out / "model")
    assert tok.decoder is not None and tok.renderer is not None
    assert tok.quantizer.codebook.initted.item() == 1
    # stage 1 trained encoder and decoder; stage 2 changed only the renderer (encoder, codebook frozen)
    fresh = SelftokTokenizer(tok.cfg).state_dict()
    s1 = load_file(str(out / "stage1" / "model" / "model.safetensors"))
    final = load_file(str(out / "model" / "model.safetensors"))
    for name in ("encoder.query_tokens", "encoder.blocks.0.attn.query_linear.weight",
                 "decoder.joint_blocks.0.x_block.attn.qkv.weight", "decoder.context_embedder.weight"):
        assert not torch.equal(s1[name], fresh[name]), f"{name} did not train in stage 1"
    for name in s1:
        if not name.startswith("renderer."):
            assert torch.equal(s1[name], final[name]), f"{name} changed in stage 2"
    changed = [n for n in final if n.startswith("renderer.") and not torch.equal(s1[n], final[n])]
    assert "renderer.joint_blocks.0.x_block.attn.qkv.weight" in changed
    assert "renderer.positional_embedding" in changed


def test_resume_with_a_different_config_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, "stage1.steps=2", "stage2.steps=0", "eval.num_images=0")
    with pytest.raises(ConfigError, match=r"stage1\.optim\.lr: 0\.001 -> 0\.002"):
        run(out, "stage1.steps=2", "stage2.steps=0", "eval.num_images=0", "stage1.optim.lr=0.002")


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = train_mod.Stage1Objective.forward

    def poisoned(self, latents, fb, mix, shape_factor=1.0):
        loss, per_sample, metrics = original(self, latents, fb, mix, shape_factor)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 6 else loss), per_sample, metrics

    monkeypatch.setattr(train_mod.Stage1Objective, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5"):
        run(out, "stage1.steps=10", "stage2.steps=0", "eval.num_images=0", "run.checkpoint_every=2")
    last = latest_checkpoint(out / "stage1")
    assert last is not None and last.name == "step_00000004"
    state = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (out / "stage1" / "model").exists()


def make_folder(root: Path, good: int, bad: int) -> None:
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(good):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"good_{i:03d}.png")
    for i in range(bad):
        (root / f"bad_{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png" * (i + 1))


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "images"
    make_folder(folder, good=28, bad=4)
    data = ["data.kind=imagefolder", f"data.path={folder}", "eval.num_images=0", "stage2.steps=0",
            "data.transform.image_size=32"]
    results = run(tmp_path / "ok", "stage1.steps=6", "stream.max_reject_fraction=0.5", *data)
    assert results["stage1_inputs_seen"] == 6 * 8
    rejected = results["stage1_inputs_rejected"]
    assert set(rejected) <= {"corrupt", "truncated", "not_an_image"} and sum(rejected.values()) > 0
    with pytest.raises(TooManyRejectsError, match=r"more than stream.max_reject_fraction = 1.0%"):
        run(tmp_path / "strict", "stage1.steps=6", "stream.max_reject_fraction=0.01",
            "stream.min_inputs_for_check=8", *data)


def test_joint_renderer_trains_in_stage_one(tmp_path):
    out = tmp_path / "run"
    results = run(out, "stage1.steps=6", "stage2.steps=2", "eval.num_images=0", "stage1.renderer_weight=1.0")
    assert results["stage1_steps_this_session"] == 6
    fresh = SelftokTokenizer(SelftokTokenizer.from_pretrained(out / "model").cfg).state_dict()
    s1 = load_file(str(out / "stage1" / "model" / "model.safetensors"))
    for name in ("renderer.joint_blocks.0.x_block.attn.qkv.weight", "renderer.context_embedder.weight"):
        assert not torch.equal(s1[name], fresh[name]), f"{name} did not train in stage 1"
    # stage 2 continued from the jointly trained renderer (not re-initialised from the decoder)
    final = load_file(str(out / "model" / "model.safetensors"))
    w = "renderer.final_layer.linear.weight"
    assert not torch.equal(final[w], -s1[w.replace("renderer.", "decoder.")])


def test_jointly_trained_renderer_is_evaluated_in_stage_one(tmp_path):
    """With `stage1.renderer_weight` the stage-1 evaluation also judges the renderer, so a run that skips
    stage 2 still reports renderer figures."""
    out = tmp_path / "run"
    results = run(out, "stage1.steps=4", "stage2.steps=0", "eval.num_images=4", "eval.decoder_steps=2",
                  "stage1.renderer_weight=1.0")
    assert {"decoder", "renderer"} <= results.keys()
    assert json.loads((out / "eval" / "stage1_step4_renderer.json").read_text())["which"] == "renderer"
    assert json.loads((out / "eval" / "stage1_step4.json").read_text())["which"] == "decoder"


def test_stage_two_alone_continues_a_tokenizer_with_the_shape_term(tmp_path):
    """init.tokenizer + stage 2 only (docs/tokenizer_training.md, the renderer alone): the shape net is trained
    although stage 1 is skipped, and only the renderer changes, so the codes stay those of the start."""
    learned = ["model.latent.kind=autoencoder", "model.latent.factor=4",
               "model.latent.autoencoder={block_out_channels: [8, 16, 32]}", "stage0.batch_size=8",
               "stage0.normalisation_images=32", "shape_net.images=32", "shape_net.batch_size=8",
               "eval.num_images=0", "run.tensorboard=false"]
    first = tmp_path / "first"
    run(first, *learned, "stage0.steps=4", "stage1.steps=4", "stage2.steps=0", "shape_net.steps=0")
    second = tmp_path / "second"
    results = run(second, *learned, f"init.tokenizer={first / 'model'}", "stage0.steps=0", "stage1.steps=0",
                  "stage2.steps=4", "shape_net.steps=4", "stage2.shape_weight=1")
    assert "shape_net" in results and (second / "shape_net" / "model.safetensors").is_file()
    start, end = (load_file(str(d / "model" / "model.safetensors")) for d in (first, second))
    assert start.keys() == end.keys()
    assert all(torch.equal(start[n], end[n]) for n in start if not n.startswith("renderer.")), "codes changed"
    w = "renderer.joint_blocks.0.x_block.attn.qkv.weight"
    assert not torch.equal(start[w], end[w]), "the renderer did not train"
