"""Numerical equivalence with the official implementation on its reference data (fp32, CPU).

The reference weights, inputs and outputs were produced by the official code (see
tests/fixtures/official/reference/README.md). Token ids, masks and schedule values must be identical;
float outputs within 1e-4 (the 6-step sampler output within 2e-4)."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizer_testutil import REFERENCE, load_reference_model, reference_io, single_thread  # noqa: F401

from selftok.model.layers import sincos_1d, sincos_2d, token_positions
from selftok.model.mmdit import joint_attention_mask
from selftok.model.schedule import visible_mask

ATOL = 1e-4


@pytest.fixture(scope="module")
def io():
    return reference_io()


@pytest.fixture(scope="module")
def tok():
    return load_reference_model("tokenizer")


@pytest.fixture(scope="module")
def ren():
    return load_reference_model("renderer")


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def capture(blocks):
    outs, hooks = {}, []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(lambda m, inp, out, i=i: outs.__setitem__(i, out)))
    return outs, hooks


@torch.no_grad()
def test_encoder_intermediates(tok, io):
    patch = {}
    h = tok.encoder.x_embedder.register_forward_hook(lambda m, inp, out: patch.__setitem__("out", out))
    outs, hooks = capture(tok.encoder.blocks)
    features = tok.encoder(io["enc.x"])
    for hook in hooks + [h]:
        hook.remove()
    close(patch["out"], io["enc.patch_embed_out"])
    depth = len(tok.encoder.blocks)
    for i in range(depth):
        close(outs[i][1], io[f"enc.block{i}.query_out"])
        if i < depth - 1:  # the last block's image stream is dead and not computed
            close(outs[i][0], io[f"enc.block{i}.x_out"])
    close(features, io["enc.to_quantizer_features"])


@torch.no_grad()
def test_quantizer_ids_and_codes(tok, io):
    q = tok.quantizer
    features = io["enc.to_quantizer_features"]
    close(q.project_in(features), io["enc.project_in_out"])
    unit = q.normalized_inputs(features)
    close(unit @ q.codebook.embed[0].T, io["enc.codebook_sims"])
    ids = tok.encode_latents(io["enc.x"])
    assert ids.dtype == torch.int64
    assert torch.equal(ids, io["enc.indices"])
    assert torch.equal(q.codebook.embed[0][ids], io["enc.outs_q_prenorm"])  # a gather: exact
    close(tok.codes_to_vectors(ids), io["enc.outs_q"])
    # round trip: the vectors rebuilt from the ids equal the encoder's quantized output
    out = tok.quantize_latents(io["enc.x"])
    assert torch.equal(out.indices, ids)
    assert torch.equal(tok.codes_to_vectors(out.indices), out.vectors)
    # the depth call: prefix masks and masked vectors
    mask = visible_mask(io["enc_d.d"], tok.K)
    assert torch.equal(mask, io["enc_d.attn_mask"])
    close(out.vectors * mask[..., None], io["enc_d.encoder_hidden_states"])


@torch.no_grad()
def test_bf16_autocast_keeps_token_ids(tok, io):
    """The lookup is an fp32 island: under bf16 autocast the same features give the same ids. A bf16 encoder
    body may move features by ~1e-2, which can flip only near-ties (top-1/top-2 cosine gap < 1e-3)."""
    q, features = tok.quantizer, io["enc.to_quantizer_features"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.lookup(q.normalized_inputs(features)), io["enc.indices"])
        ids = tok.encode_latents(io["enc.x"])
    top2 = io["enc.codebook_sims"].topk(2, dim=-1).values
    near_tie = (top2[..., 0] - top2[..., 1]) < 1e-3
    assert near_tie.sum() <= 1
    assert torch.equal(ids[~near_tie], io["enc.indices"][~near_tie])


@pytest.mark.parametrize("case", ["vel_a", "vel_b"])
@torch.no_grad()
def test_decoder_velocity_with_masks(tok, io, case):
    t = io[f"{case}.t"]
    t_mapped = (t * 1000).long()
    assert torch.equal(t_mapped, io[f"{case}.t_mapped"])
    k = tok.schedule.last_visible(t_mapped)
    assert torch.equal(k, io[f"{case}.k"])
    mask = visible_mask(k, tok.K)
    assert torch.equal(mask, io[f"{case}.mask"])
    vectors = io[f"{case}.encoder_hidden_states"]
    outs, hooks = capture(tok.decoder.joint_blocks)
    v = tok.decoder(io[f"{case}.xt"], t, vectors, mask)
    for h in hooks:
        h.remove()
    close(v, io[f"{case}.v"])
    depth = len(tok.decoder.joint_blocks)
    for i in range(depth):
        close(outs[i][1], io[f"{case}.joint_block{i}.x_out"])
        if i < depth - 1:  # only the computed prefix (up to the last visible token in the batch) exists
            kept = outs[i][0].shape[1]
            assert kept == int(k.max()) + 1
            close(outs[i][0], io[f"{case}.joint_block{i}.ctx_out"][:, :kept])
    # zeroing invisible tokens changes nothing; token modulations precomputed once give the same result
    close(tok.decoder(io[f"{case}.xt"], t, vectors * mask[..., None], mask, tok.decoder.token_modulations()), v,
          atol=1e-6)


@torch.no_grad()
def test_decoder_prefix_truncation_equals_full_masked_attention(tok, io):
    """The decoder drops tokens after the last visible one; the untruncated masked computation agrees."""
    dec, case = tok.decoder, "vel_a"
    xt, t, vectors = io[f"{case}.xt"], io[f"{case}.t"], io[f"{case}.encoder_hidden_states"]
    mask = io[f"{case}.mask"]
    p = dec.cfg.patch_size
    x = dec.x_embedder(xt) + dec.pos_embed.reshape(1, dec.grid, dec.grid, -1)[:, 2:14, 2:14].reshape(1, 144, -1)
    attn = joint_attention_mask(mask, tok.K, x.shape[1], True, 3, xt.device)
    out = dec.run_blocks(dec.embed_context(vectors), x, dec.t_embedder(t * 1000.0), None, attn)
    full = out.reshape(3, 12, 12, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(xt.shape)
    close(full, io[f"{case}.v"])
    close(dec(xt, t, vectors, mask), full, atol=1e-5)


@torch.no_grad()
def test_sampler_six_steps(tok, io):
    grid = tok.schedule.sampler_grid(6)
    assert torch.equal(grid.t, io["sample.scheduled_t"])
    assert torch.equal(grid.t_next, io["sample.scheduled_t_prev"])
    assert torch.equal(grid.t * 1000, io["sample.timestep_map"])
    assert torch.equal(grid.t_mapped, io["sample.t_mapped"])
    assert torch.equal(grid.last_visible[:, None].expand(6, 3), io["sample.step_k"])
    vectors = tok.codes_to_vectors(io["enc.indices"])
    close(vectors, io["sample.encoder_hidden_states"])
    for i in range(6):
        assert torch.equal(io["sample.step_t"][i], grid.t[i].expand(3))
        assert torch.equal(visible_mask(grid.last_visible[i].expand(3), tok.K), io["sample.step_mask"][i])
        keep = int(grid.last_visible[i]) + 1
        v = tok.decoder(io["sample.step_x_in"][i], io["sample.step_t"][i], vectors[:, :keep])
        close(v, io["sample.step_v"][i])
    out = tok.decode_latents(io["enc.indices"], steps=6, noise=io["sample.noise"])
    close(out, io["sample.out"], atol=2e-4)


@torch.no_grad()
def test_renderer(ren, io):
    vectors = ren.codes_to_vectors(io["render.indices"])
    close(vectors, io["render.encoder_hidden_states"])
    outs, hooks = capture(ren.renderer.joint_blocks)
    out = ren.render_latents(io["render.indices"])
    for h in hooks:
        h.remove()
    close(out, io["render.out"])
    for i in range(3):
        close(outs[i][1], io[f"render.joint_block{i}.x_out"])
        if i < 2:
            close(outs[i][0], io[f"render.joint_block{i}.ctx_out"])


def test_sincos_tables_match_official_init():
    ref = load_file(str(REFERENCE / "init_reference.safetensors"))
    enc = ref["encoder.pos_embed"]  # [1, 48*48, 48]
    close(sincos_2d(enc.shape[-1], 48)[None], enc, atol=1e-6)
    ctx = ref["model.context_pos_embed"]  # [1, 24, 192] at positions 1000 + 8k
    close(sincos_1d(ctx.shape[-1], token_positions(24).float()).float()[None], ctx, atol=1e-6)


@torch.no_grad()
def test_eval_is_side_effect_free_and_deterministic(tok, io):
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    ids = tok.encode_latents(io["enc.x"])
    a = tok.decode_latents(ids, steps=3, generator=torch.Generator().manual_seed(1))
    b = tok.decode_latents(ids, steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(tok.encode_latents(io["enc.x"]), ids)
    after = tok.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not F.normalize(tok.quantizer.codebook.embed, dim=-1).isnan().any()
