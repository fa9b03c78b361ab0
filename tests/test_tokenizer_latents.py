"""Latent adapters: the lossless pixel-unshuffle adapter, the SD3-VAE adapter (a tiny random diffusers
AutoencoderKL saved to a local directory stands in for the real VAE) and the learned autoencoder."""
import pytest
import torch
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.model.latents import (
    SD3_SCALE,
    SD3_SHIFT,
    AutoencoderConfig,
    AutoencoderLatents,
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


# ---------------------------------------------------------------------------------------------- learned autoencoder
def tiny_autoencoder_config(**kw) -> LatentConfig:
    return LatentConfig(kind="autoencoder", factor=4,
                        autoencoder=AutoencoderConfig(block_out_channels=(8, 8, 16), latent_channels=4, **kw))


def test_autoencoder_adapter_normalises_per_channel_and_runs_in_float32():
    torch.manual_seed(0)
    ae = build_latent_adapter(tiny_autoencoder_config())
    assert isinstance(ae, AutoencoderLatents) and ae.channels == 4 and ae.factor == 4
    images = torch.rand(6, 3, 16, 16)
    raw = ae.raw_encode(images)
    assert raw.shape == (6, 4, 4, 4)
    ae.set_normalisation(raw)
    z = ae.encode(images)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)
    with torch.autocast("cpu", torch.bfloat16):
        assert ae.encode(images).dtype == torch.float32 and ae.decode(z).dtype == torch.float32
    z = z.detach().requires_grad_()
    out = ae.decode(z)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    out.sum().backward()  # differentiable: stage-1/2 pixel terms flow through the decoder
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not divisible by the autoencoder's factor 4"):
        ae.encode(torch.rand(1, 3, 18, 16))


def test_autoencoder_config_errors():
    with pytest.raises(ValueError, match="latent.factor 8 disagrees .* 2 stride-2 stages"):
        LatentConfig(kind="autoencoder", factor=8, autoencoder=AutoencoderConfig(block_out_channels=(8, 8, 16)))
    with pytest.raises(ValueError, match="latent.autoencoder is set but latent.kind is 'pixel'"):
        LatentConfig(kind="pixel", factor=4, autoencoder=AutoencoderConfig())
    with pytest.raises(ValueError, match=r"\[12\] are not divisible by norm_num_groups 8"):
        AutoencoderConfig(block_out_channels=(8, 12))
    assert LatentConfig(kind="autoencoder").channels == 16  # default architecture: 8x down, 16 channels
