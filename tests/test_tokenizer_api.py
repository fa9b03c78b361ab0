"""The public SelftokTokenizer API on a tiny pixel-space model: shapes, round trips, save/load, bad input,
side-effect-free deterministic eval, dtype handling, and the per-step visible-token prefix of the sampler."""
import pytest
import torch
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.model.latents import PixelLatents
from selftok.model.presets import get_preset, load_tokenizer_config
from selftok.model.schedule import visible_mask
from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.config import ConfigError


def randomize(model: SelftokTokenizer, seed: int = 0) -> SelftokTokenizer:
    """Non-zero weights everywhere (the official init zeroes every AdaLN, which would hide the tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1
                    else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return randomize(SelftokTokenizer(get_preset("tiny")))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_shapes_and_ranges(tok, images):
    codes = tok.encode(images)
    assert codes.shape == (2, tok.K) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < tok.codebook_size
    rec = tok.decode(codes, steps=3, generator=torch.Generator().manual_seed(0))
    fast = tok.render(codes)
    for out in (rec, fast):
        assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1


def test_round_trips(tok, images):
    latents = tok.latents.encode(images)
    assert torch.allclose(tok.latents.decode(latents), images, atol=1e-6)  # pixel adapter is lossless
    out = tok.quantize_latents(latents)
    assert torch.equal(out.indices, tok.encode(images))
    assert torch.equal(tok.codes_to_vectors(out.indices), out.vectors)
    assert out.vectors.shape == (2, tok.K, tok.cfg.quantizer.vector_dim)


def test_decoder_and_renderer_take_code_vectors_as_well_as_indices(tok, images):
    out = tok.quantize_latents(tok.latents.encode(images))
    noise = [torch.Generator().manual_seed(5) for _ in range(2)]
    assert torch.equal(tok.decode(vectors=out.vectors, steps=3, generator=noise[0]),
                       tok.decode(out.indices, steps=3, generator=noise[1]))
    assert torch.equal(tok.render(vectors=out.vectors), tok.render(out.indices))
    assert torch.equal(tok.render_latents(vectors=out.vectors), tok.render_latents(out.indices))
    # vectors that are not codebook entries decode too (e.g. an interpolation between two images' codes)
    mixed = 0.5 * (out.vectors[:1] + out.vectors[1:])
    assert tok.render(vectors=mixed).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="exactly one of codes"):
        tok.render(out.indices, vectors=out.vectors)
    with pytest.raises(ValueError, match="exactly one of codes"):
        tok.decode(steps=3)
    with pytest.raises(ValueError, match=r"vectors must have shape \(B, 16, 8\)"):
        tok.render(vectors=out.vectors[:, :-1])
    with pytest.raises(ValueError, match="floating point"):
        tok.render(vectors=out.indices[..., None].expand(-1, -1, 8))


def test_save_load_reproduces_outputs_exactly(tok, images, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "model.safetensors").is_file() and (tmp_path / "tok" / "config.yaml").is_file()
    back = SelftokTokenizer.from_pretrained(tmp_path / "tok")
    a, b = tok.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    codes = tok.encode(images)
    assert torch.equal(back.encode(images), codes)
    g = lambda: torch.Generator().manual_seed(7)
    assert torch.equal(back.decode_latents(codes, 2, g()), tok.decode_latents(codes, 2, g()))
    assert torch.equal(back.render_latents(codes), tok.render_latents(codes))


def test_strict_own_format(tok):
    state = dict(tok.state_dict())
    state.pop("decoder.final_layer.linear.bias")
    state["decoder.bogus"] = torch.zeros(1)
    state["encoder.query_tokens"] = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match=r"1 missing: decoder\.final_layer\.linear\.bias.*1 unexpected: "
                                         r"decoder\.bogus.*mis-shaped: encoder\.query_tokens"):
        SelftokTokenizer.from_state_dict(tok.cfg, state)


@pytest.mark.parametrize("bad,match", [
    (torch.rand(1, 1, 32, 32), "RGB"),
    (torch.rand(1, 4, 32, 32), "RGB"),
    ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), "float"),
    (torch.rand(1, 3, 32, 32) * 2, r"\[0, 1\]"),
    (torch.full((1, 3, 32, 32), float("nan")), r"\[0, 1\]"),
    (torch.rand(3, 32, 32), r"\(B, 3, H, W\)"),
    (torch.rand(1, 3, 30, 32), "not divisible"),
    (torch.rand(1, 3, 36, 36), "not divisible by the encoder patch size"),
    (torch.rand(1, 3, 264, 264), "larger than the encoder"),
])
def test_bad_images(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        tok.encode(bad)


def test_bad_codes(tok):
    K, C = tok.K, tok.codebook_size
    with pytest.raises(ValueError, match=rf"\[0, {C}\).*from {C} to {C}"):
        tok.render(torch.full((1, K), C))
    with pytest.raises(ValueError, match="from -1"):
        tok.decode(torch.full((1, K), -1))
    with pytest.raises(ValueError, match=rf"{K + 1} tokens per image.*K = {K}"):
        tok.codes_to_vectors(torch.zeros(1, K + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tok.render(torch.zeros(1, K))
    with pytest.raises(ValueError, match="latents must have shape"):
        tok.encode_latents(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="larger than the decoder"):
        tok.decode(torch.zeros(1, K, dtype=torch.long), steps=1, size=(32, 64))


def test_missing_decoder_or_renderer_is_explained(tok):
    cfg = get_preset("tiny")
    cfg.renderer = None
    model = SelftokTokenizer(cfg).eval()
    with pytest.raises(ValueError, match="no renderer.*use decode"):
        model.render(torch.zeros(1, model.K, dtype=torch.long))


def test_eval_is_side_effect_free_and_deterministic(tok, images):
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    codes = tok.encode(images)
    assert torch.equal(tok.encode(images), codes)
    a = tok.decode(codes, steps=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, tok.decode(codes, steps=2, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(tok.render(codes), tok.render(codes))
    after = tok.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sampler_drops_invisible_tokens_like_full_masked_steps(tok, images):
    """decode_latents computes only the visible prefix at each step, with modulations computed once; a plain
    loop over all K tokens with the step's mask gives the same latent."""
    codes = tok.encode(images)
    noise = torch.randn(2, tok.cfg.latent.channels, 8, 8, generator=torch.Generator().manual_seed(2))
    fast = tok.decode_latents(codes, steps=5, noise=noise)
    vectors, grid, x = tok.codes_to_vectors(codes), tok.schedule.sampler_grid(5), noise.clone()
    with torch.no_grad():
        for i in range(5):
            mask = visible_mask(grid.last_visible[i].expand(2), tok.K)
            x = x - (grid.t[i] - grid.t_next[i]) * tok.decoder(x, grid.t[i].expand(2), vectors, mask)
    torch.testing.assert_close(fast, x, atol=1e-5, rtol=1e-5)
    assert grid.last_visible[-1] < tok.K - 1  # the prefix really shrank


def test_visibility_semantics(tok, images):
    """An invisible token cannot change the velocity; a visible one does."""
    codes = tok.encode(images)[:1]
    x = torch.randn(1, tok.cfg.latent.channels, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.3])
    k = int(tok.schedule.last_visible_at(t))
    mask = visible_mask(torch.tensor([k]), tok.K)
    with torch.no_grad():
        v = tok.decoder(x, t, tok.codes_to_vectors(codes), mask)
        other = codes.clone()
        other[0, k + 1] = (codes[0, k + 1] + 1) % tok.codebook_size
        assert torch.equal(tok.decoder(x, t, tok.codes_to_vectors(other), mask), v)
        other[0, k] = (codes[0, k] + 1) % tok.codebook_size
        assert not torch.allclose(tok.decoder(x, t, tok.codes_to_vectors(other), mask), v)


def test_bf16(tok, images):
    codes = tok.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tok.encode(images).shape == codes.shape
        dec = tok.decode_latents(codes, steps=2, generator=torch.Generator().manual_seed(0))
        ren = tok.render_latents(codes)
    ref = tok.render_latents(codes)
    assert dec.dtype == ren.dtype == torch.float32 and dec.isfinite().all()
    assert (ren - ref).abs().max() < 0.1 * ref.abs().max()
    cast = randomize(SelftokTokenizer(get_preset("tiny"))).cast_for_inference(torch.bfloat16)
    assert cast.quantizer.codebook.embed.dtype == torch.float32
    assert cast.decoder.x_embedder.proj.weight.dtype == torch.bfloat16
    assert cast.render(cast.encode(images)).shape == images.shape
    assert cast.decode(cast.encode(images), steps=1).shape == images.shape


def test_non_square_images(tok):
    imgs = torch.rand(1, 3, 32, 16)
    assert tok.encode(imgs).shape == (1, tok.K)
    assert isinstance(tok.latents, PixelLatents)


def test_config_presets_and_overrides(tmp_path):
    cfg = load_tokenizer_config("selftok-512", overrides=["encoder.depth=2", "decoder.depth=2",
                                                          "decoder.num_heads=2"])
    assert cfg.encoder.depth == 2 and cfg.decoder.hidden_size == 128 and cfg.schedule.K == 512
    (tmp_path / "t.yaml").write_text("schedule: {K: 8, stages: [1000], k_per_stage: [8]}\n")
    cfg = load_tokenizer_config("tiny", tmp_path / "t.yaml")
    assert cfg.schedule.K == 8 and cfg.encoder.depth == 2
    with pytest.raises(ConfigError, match="unknown tokenizer preset"):
        load_tokenizer_config("nope")
    with pytest.raises(ConfigError, match="disagrees with the schedule"):
        load_tokenizer_config("tiny", overrides=["schedule.K=17"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_tokenizer_config("tiny", overrides=["encoder.width=3"])


def test_learned_autoencoder_travels_inside_the_saved_tokenizer(tmp_path):
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from selftok.model.latents import AutoencoderConfig, LatentConfig
    cfg = get_preset("tiny")
    cfg = replace(cfg, latent=LatentConfig(kind="autoencoder", factor=4,
                                           autoencoder=AutoencoderConfig(block_out_channels=(8, 8, 16),
                                                                         latent_channels=cfg.latent.channels)))
    torch.manual_seed(0)
    tok = randomize(SelftokTokenizer(cfg))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tok.save_pretrained(tmp_path / "tok")
    weights = tmp_path / "tok" / "model.safetensors"
    assert any(k.startswith("latents.vae.") for k in load_file(str(weights)))
    back = SelftokTokenizer.from_pretrained(tmp_path / "tok")
    codes = tok.encode(images)
    assert torch.equal(back.encode(images), codes) and torch.equal(back.render(codes), tok.render(codes))
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("latents.")}, str(weights))
    with pytest.raises(ValueError, match="has no learned autoencoder"):
        SelftokTokenizer.from_pretrained(tmp_path / "tok")
    tok.save_pretrained(tmp_path / "tok")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read .*model.safetensors.*truncated"):
        SelftokTokenizer.from_pretrained(tmp_path / "tok")
