"""Shipped tokenizers: the manifest check, shipping a run, and — for the tokenizer the package ships — that
its files load and reproduce the held-out figures recorded next to them."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.model.presets import get_preset
from selftok.model.tokenizer import SelftokTokenizer
from selftok.pretrained import (EVALUATION, ROOT, SUMMARY, ShippedFileError, install, load_shipped,
                                manifest_digest, shipped_dir, shipped_names, subset_figures)
from selftok.pretrained.__main__ import main, ship

EVAL_FILES = ["stage0_step500.json", "stage0_step1000.json", "stage0_step1000.png", "stage1_step500.json",
              "stage1_step2500.json", "stage1_step2500_renderer.json", "stage1_step2500.png", "stage2_step600.json",
              "notes.txt"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 'finished run' holding a tiny untrained tokenizer and a summary."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    SelftokTokenizer(get_preset("tiny")).save_pretrained(run / "model")
    (run / "summary.json").write_text(json.dumps({"renderer": {"psnr": 12.0}}))
    (run / "config.yaml").write_text(
        "eval:\n  data: {kind: shapes, shapes: {split: heldout, n: 6, seed: 0, size: 32}, "
        "transform: {image_size: 32}}\n  num_images: 6\n  decoder_steps: 2\n  batch_size: 6\n")
    (run / "eval").mkdir()
    for name in EVAL_FILES:
        (run / "eval" / name).write_text(name)
    return run


def test_ship_writes_records_that_the_manifest_guards(run_dir, tmp_path):
    out = ship(run_dir, "tiny", "python -m selftok.train --config x.yaml", root=tmp_path, subset=8)
    record = json.loads((out / EVALUATION).read_text())
    assert record["command"] == "python -m selftok.train --config x.yaml"
    assert record["subset"]["images"] == 8 and len(record["subset"]["codes"]) == 8
    assert record["stored_dtype"] == "float16"
    assert {"psnr", "attribute_preservation", "shape_accuracy"} <= set(record["heldout"]["renderer"])
    assert record["heldout"]["decoder"]["decoder_steps"] == 2 and record["heldout"]["decoder"]["num_images"] == 6
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    trained = SelftokTokenizer.from_pretrained(run_dir / "model")
    shipped = SelftokTokenizer.from_pretrained(out)
    for (key, a), b in zip(trained.state_dict().items(), shipped.state_dict().values()):
        assert b.dtype == a.dtype and torch.equal(b, a.to(torch.float16).to(a.dtype) if a.is_floating_point() else a), key
    assert json.loads((out / SUMMARY).read_text()) == {"renderer": {"psnr": 12.0}}
    assert shipped_dir("tiny", root=tmp_path) == out
    assert (out / "eval" / "stage2_step600.json").read_text() == "stage2_step600.json"
    (out / "eval" / "stage2_step600.json").write_text("edited")
    with pytest.raises(ShippedFileError, match=r"eval/stage2_step600.json has SHA-256"):
        shipped_dir("tiny", root=tmp_path)
    (out / "eval" / "stage2_step600.json").write_text("stage2_step600.json")
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-10])
    with pytest.raises(ShippedFileError, match=r"model.safetensors has SHA-256 .* records"):
        shipped_dir("tiny", root=tmp_path)
    weights.write_bytes(good)
    (out / "config.yaml").unlink()
    with pytest.raises(ShippedFileError, match="config.yaml is missing"):
        shipped_dir("tiny", root=tmp_path)
    with pytest.raises(ShippedFileError, match="no shipped tokenizer 'other'"):
        shipped_dir("other", root=tmp_path)
    (run_dir / "summary.json").rename(run_dir / "summary.moved")
    with pytest.raises(SystemExit, match="summary.json is missing"):
        ship(run_dir, "again", "cmd", root=tmp_path, heldout=False)
    (run_dir / "summary.moved").rename(run_dir / "summary.json")


def test_install_lays_the_shipped_tokenizer_out_as_a_finished_run(run_dir, tmp_path):
    root = tmp_path / "shipped"
    ship(run_dir, "tiny", "cmd", root=root, subset=4, dtype=None, heldout=False)
    digest = manifest_digest("tiny", root)
    out = install("tiny", tmp_path / "demo" / "tokenizer", expect=digest, root=root)
    tok = SelftokTokenizer.from_pretrained(out / "model")
    shipped = SelftokTokenizer.from_pretrained(root / "tiny")
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), shipped.state_dict().values()))
    assert sorted(p.name for p in (out / "eval").iterdir()) == [  # each stage's last evaluation
        "stage0_step1000.json", "stage0_step1000.png", "stage1_step2500.json", "stage1_step2500.png",
        "stage1_step2500_renderer.json", "stage2_step600.json"]
    assert json.loads((out / "summary.json").read_text()) == {"renderer": {"psnr": 12.0}}
    assert json.loads((out / "shipped.json").read_text())["manifest_sha256"] == digest
    with pytest.raises(ShippedFileError, match=f"manifest has SHA-256 {digest}, expected 0+"):
        install("tiny", tmp_path / "other", expect="0" * 64, root=root)
    (root / "tiny" / "config.yaml").write_text("changed: true\n")
    with pytest.raises(ShippedFileError, match="config.yaml has SHA-256"):
        install("tiny", tmp_path / "other", root=root)
    assert not (tmp_path / "other").exists()


def test_install_command_reports_a_missing_tokenizer(tmp_path):
    with pytest.raises(SystemExit, match="error: no shipped tokenizer 'no_such'"):
        main(["install", "no_such", str(tmp_path / "out")])


@pytest.mark.skipif("shapes" not in shipped_names(), reason="no shapes tokenizer shipped yet")
def test_shipped_shapes_tokenizer_reproduces_its_recorded_figures():
    tok = load_shipped("shapes")
    recorded = json.loads((ROOT / "shapes" / EVALUATION).read_text())["subset"]
    now = subset_figures(tok, recorded["images"])
    same = (torch.tensor(now["codes"]) == torch.tensor(recorded["codes"])).float().mean()
    assert same >= 0.99, f"only {same:.3f} of the codes agree with the recorded ones"
    assert now["psnr"] == pytest.approx(recorded["psnr"], abs=0.1)
    assert now["attribute_preservation"] == pytest.approx(recorded["attribute_preservation"], abs=1 / 32 + 1e-9)
    assert now["shape_accuracy"] == pytest.approx(recorded["shape_accuracy"], abs=0.03)
    summary = json.loads((ROOT / "shapes" / SUMMARY).read_text())
    assert summary["renderer"]["attribute_preservation"] >= 0.90  # the bar, on all 500 held-out scenes
