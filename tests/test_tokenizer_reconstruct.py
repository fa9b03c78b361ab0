"""The reconstruction CLI on a tiny saved tokenizer: grids, PSNR JSON, and its PSNR definition."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.data.images import TransformConfig, prepare_image
from selftok.model.presets import get_preset
from selftok.model.tokenizer import SelftokTokenizer
from selftok.reconstruct import load_image, main
from selftok.training.metrics import PSNR_MAX_DB, psnr


def test_psnr_8bit_analytic():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a, a).tolist() == [PSNR_MAX_DB]  # identical images: capped (the official formula gives inf)
    b = torch.full((1, 3, 4, 4), 1 / 255)  # one 8-bit level everywhere: MSE = 1
    assert psnr(a, b)[0].item() == pytest.approx(20 * math.log10(255))


def test_reconstruct_preprocesses_images_like_training_and_pretokenization(tmp_path):
    # 100×67 → short side 64: torchvision's Resize truncates the long side to 95 (the old loader rounded to 96)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (67, 100, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    expected = prepare_image(Image.open(tmp_path / "im.png"), TransformConfig(image_size=64)).float() / 255
    assert torch.equal(load_image(tmp_path / "im.png", 64), expected)


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
