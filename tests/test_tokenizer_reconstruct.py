"""The reconstruction CLI on a tiny saved tokenizer: grids, PSNR JSON, and its PSNR definition."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.presets import get_preset
from selftok.reconstruct import main, psnr_8bit
from selftok.tokenizer import SelftokTokenizer


def test_psnr_8bit_analytic():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr_8bit(a, a) == [float("inf")]
    b = torch.full((1, 3, 4, 4), 1 / 255)  # one 8-bit level everywhere: MSE = 1
    assert psnr_8bit(a, b)[0] == pytest.approx(20 * math.log10(255))


def test_reconstruct_folder(tmp_path):
    torch.manual_seed(0)
    SelftokTokenizer(get_preset("tiny")).save_pretrained(tmp_path / "tok")
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(32, 32), (48, 40), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / f"im{i}.png")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main([f"tokenizer={tmp_path / 'tok'}", f"images={src}", f"out={out}", "steps=2", "batch_size=2"]) == 0
    result = json.loads((out / "psnr.json").read_text())
    saved = json.loads((out / "psnr.json").read_text())
    assert saved["mean_psnr"] == result["mean_psnr"]
    assert set(saved["mean_psnr"]) == {"diffusion", "renderer"}
    assert len(saved["images"]) == 3 and all(math.isfinite(v) for r in saved["images"] for v in r["psnr"].values())
    for i in range(3):
        assert Image.open(out / f"im{i}.png").size == (3 * 32, 32)  # input | diffusion | renderer


def test_reconstruct_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main([f"images={tmp_path}", f"out={tmp_path}"])  # neither tokenizer= nor official=
