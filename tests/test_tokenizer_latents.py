"""Latent adapters: the lossless pixel-unshuffle adapter and the SD3-VAE adapter (a tiny random diffusers
AutoencoderKL saved to a local directory stands in for the real VAE)."""
import pytest
import torch
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.model.latents import (
    SD3_SCALE,
    SD3_SHIFT,
    LatentConfig,
    PixelLatents,
    SD3VAELatents,
    build_latent_adapter,
)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32)
    root = tmp_path_factory.mktemp("sd3")
    vae.save_pretrained(root / "vae")  # a pipeline-style folder with a vae/ subfolder
    return root, vae.eval()


def test_pixel_adapter_is_lossless_and_shaped():
    pix = build_latent_adapter(LatentConfig(kind="pixel", factor=4))
    assert isinstance(pix, PixelLatents) and pix.channels == 48
    images = torch.rand(2, 3, 16, 24)
    z = pix.encode(images)
    assert z.shape == (2, 48, 4, 6) and z.min() >= -1 and z.max() <= 1
    assert torch.allclose(pix.decode(z), images, atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by the pixel-unshuffle factor 4"):
        pix.encode(torch.rand(1, 3, 18, 16))


def test_sd3_adapter_normalises_the_posterior_mode(vae_dir):
    root, vae = vae_dir
    adapter = build_latent_adapter(LatentConfig(kind="sd3_vae", path=str(root)))
    assert isinstance(adapter, SD3VAELatents)
    images = torch.rand(2, 3, 32, 32)
    z = adapter.encode(images)
    assert z.shape == (2, 16, 4, 4)
    with torch.no_grad():
        mode = vae.encode(images * 2 - 1).latent_dist.mode()
        torch.testing.assert_close(z, (mode - SD3_SHIFT) * SD3_SCALE)
        assert torch.equal(adapter.encode(images), z)  # the mode, not a sample: deterministic
        expected = ((vae.decode(z / SD3_SCALE + SD3_SHIFT).sample.clamp(-1, 1) + 1) / 2)
    torch.testing.assert_close(adapter.decode(z), expected)


def test_sd3_adapter_errors(tmp_path):
    with pytest.raises(ValueError, match="no VAE directory"):
        SD3VAELatents(None).encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(FileNotFoundError, match="config.json"):
        SD3VAELatents(str(tmp_path)).encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="factor must be 8"):
        LatentConfig(kind="sd3_vae", factor=4)


def test_tokenizer_end_to_end_through_the_vae(vae_dir):
    """Images → VAE latents → official-structure tokenizer → codes → renderer → VAE → images."""
    from tokenizer_testutil import load_reference_model
    tok = load_reference_model("renderer")
    tok.latents = SD3VAELatents(str(vae_dir[0]))
    images = torch.rand(2, 3, 192, 192)
    codes = tok.encode(images)
    assert codes.shape == (2, tok.K)
    assert torch.equal(codes, tok.encode_latents(tok.latents.encode(images)))
    out = tok.render(codes)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
