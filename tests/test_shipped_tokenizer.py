"""Shipped tokenizers: the manifest check, shipping a run, and — for the tokenizer the package ships — that
its files load and reproduce the held-out figures recorded next to them."""
import json
import shutil

import pytest
import torch
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.model.presets import get_preset
from selftok.model.tokenizer import SelftokTokenizer
from selftok.pretrained import (EVALUATION, ROOT, SUMMARY, ShippedFileError, load_shipped, shipped_dir,
                                shipped_names, subset_figures)
from selftok.pretrained.__main__ import ship


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 'finished run' holding a tiny untrained tokenizer and a summary."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    SelftokTokenizer(get_preset("tiny")).save_pretrained(run / "model")
    (run / "summary.json").write_text(json.dumps({"renderer": {"psnr": 12.0}}))
    return run


def test_ship_writes_records_that_the_manifest_guards(run_dir, tmp_path):
    out = ship(run_dir, "tiny", "python -m selftok.train --config x.yaml", root=tmp_path, subset=8)
    record = json.loads((out / EVALUATION).read_text())
    assert record["command"] == "python -m selftok.train --config x.yaml"
    assert record["subset"]["images"] == 8 and len(record["subset"]["codes"]) == 8
    assert json.loads((out / SUMMARY).read_text()) == {"renderer": {"psnr": 12.0}}
    assert shipped_dir("tiny", root=tmp_path) == out
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
    shutil.rmtree(run_dir / "model")
    with pytest.raises(SystemExit, match="is missing"):
        ship(run_dir, "again", "cmd", root=tmp_path)


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
