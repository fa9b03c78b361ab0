"""Strict loading of official checkpoints and configs: every tensor mapped or deliberately ignored, clear
errors for missing / unexpected / mis-shaped tensors and for pickles that are not plain state dicts."""
import json

import pytest
import torch
import yaml
from tokenizer_testutil import (  # noqa: F401
    FIXTURES,
    REFERENCE,
    fixture_config,
    reference_config,
    reference_io,
    registered_presets,
    single_thread,
)

import selftok
from selftok.loaders.official import (
    CheckpointError,
    config_from_official,
    infer_official_config,
    load_official,
    map_official_state_dict,
    official_decoder_config,
    official_decoder_presets,
    official_encoder_config,
    official_encoder_presets,
    read_state_dict,
)
from selftok.model.encoder import EncoderConfig
from selftok.model.mmdit import MMDiTConfig
from selftok.model.presets import get_preset
from selftok.model.renderer import RendererConfig
from selftok.model.tokenizer import SelftokTokenizer
from selftok.runtime.config import to_dict


class NotATensor:
    pass


@pytest.fixture(scope="module")
def state():
    return read_state_dict(REFERENCE / "tokenizer.safetensors")


def meta_state(manifest: str) -> dict:
    entries = json.loads((FIXTURES / manifest).read_text())["state_dict"]
    return {e["name"]: torch.empty(e["shape"], device="meta") for e in entries}


@pytest.mark.parametrize("manifest,preset", [("manifest_tokenizer_512.json", "selftok-512"),
                                             ("manifest_tokenizer_1024.json", "selftok-1024"),
                                             ("manifest_renderer_512.json", "selftok-renderer-512")])
def test_official_yaml_and_inference_give_the_presets(manifest, preset):
    meta = json.loads((FIXTURES / manifest).read_text())["meta"]["tokenizer_params"]
    text = yaml.safe_dump({"tokenizer": {"params": meta}}).replace("'None'", "None")  # as in the official files
    params = yaml.safe_load(text)["tokenizer"]["params"]
    assert to_dict(config_from_official(params)) == to_dict(get_preset(preset))
    state = meta_state(manifest)
    cfg = infer_official_config(state)
    assert to_dict(cfg) == to_dict(get_preset(preset))
    with torch.device("meta"):
        model = SelftokTokenizer(cfg)
    mapped, ignored = map_official_state_dict(state, model)  # the full-size mapping, without memory
    assert set(mapped) == set(model.state_dict()) and len(mapped) + len(ignored) == 998


def test_load_from_yaml_and_pth(tmp_path, state):
    params = fixture_config()["tokenizer_ImageTokenizer_kwargs"]
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump({"tokenizer": {"params": params}}))
    torch.save({k: v.float() for k, v in state.items()}, tmp_path / "ckpt.pth")
    enc, dec = registered_presets()
    tok = load_official(tmp_path / "ckpt.pth", tmp_path / "cfg.yml", encoder_presets=enc, decoder_presets=dec)
    io = reference_io()
    assert torch.equal(tok.encode_latents(io["enc.x"]), io["enc.indices"])
    assert all(p.dtype == torch.float32 for p in tok.parameters())


def _expect(state, match):
    with torch.device("meta"):
        model = SelftokTokenizer(reference_config("tokenizer"))
    with pytest.raises(CheckpointError, match=match):
        map_official_state_dict(state, model)


def test_missing_unexpected_and_misshaped_tensors_are_named(state):
    s = dict(state)
    del s["model.joint_blocks.1.x_block.mlp.fc2.bias"]
    _expect(s, r"1 missing: decoder\.joint_blocks\.1\.x_block\.mlp\.fc2\.bias")
    s = dict(state, **{"encoder.blocks.0.extra.weight": torch.zeros(3)})
    _expect(s, r"1 unexpected: encoder\.blocks\.0\.extra\.weight")
    s = dict(state, **{"encoder.query_tokens": torch.zeros(1, 25, 32)})
    _expect(s, r"mis-shaped: encoder\.query_tokens: checkpoint \(1, 25, 32\) vs model \(1, 24, 32\)")
    # a dead tensor is ignored, not silently accepted under a wrong name: ignoring needs an exact match
    s = dict(state, **{"encoder.blocks.1.final_layer_norm.weight": torch.zeros(3)})
    _expect(s, "unexpected: encoder.blocks.1.final_layer_norm.weight")


def test_checkpoint_kind_mismatch(state):
    s = {k: v for k, v in state.items() if k != "model.x_embedder.proj.weight"}
    _expect(s, "neither model.x_embedder")


def test_pickles_that_are_not_state_dicts(tmp_path, state):
    torch.save({"state_dict": {"a": torch.zeros(1)}, "cfg": NotATensor()}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match="not a plain state dict.*weights_only"):
        read_state_dict(tmp_path / "obj.pth")
    torch.save({"iter": 5, "state_dict": {"a": torch.zeros(1)}}, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match=r"'iter' \(int\).*'state_dict' \(dict\).*training checkpoint"):
        read_state_dict(tmp_path / "train.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        read_state_dict(tmp_path / "list.pth")


def test_unsupported_official_settings_are_named():
    params = dict(fixture_config()["tokenizer_ImageTokenizer_kwargs"])
    enc, dec = registered_presets()
    with pytest.raises(CheckpointError, match="encoder preset 'Enc-Qformer-Bi-XL/2'"):
        config_from_official({**params, "enc": "Enc-Qformer-Bi-XL/2"}, enc, dec)
    bad = {**params, "decoder_config": {**params["decoder_config"], "sd3_cond_pooling": "last"}}
    with pytest.raises(CheckpointError, match="sd3_cond_pooling"):
        config_from_official(bad, enc, dec)
    with pytest.raises(ValueError, match="disagrees with the schedule"):
        config_from_official({**params, "k_per_stage": "8,7,5,3,2"}, enc, dec)


def test_official_registry_kwargs_become_configs():
    """The reference's Enc_models / DiT_models entries (sizes in reference/README.md: encoder patch 2, width
    48, 3 heads, depth 3, query width 32, 2 query heads; MMDiT depth 3 = 3 heads of 64; renderer the same) and
    the release's own entries, translated by the package."""
    enc, dec = registered_presets()
    assert enc == {"Enc-Qformer-Uni-TinyK24/2": EncoderConfig(patch_size=2, hidden_size=48, num_heads=3, depth=3,
                                                              query_dim=32, query_heads=2)}
    assert dec == {
        "MMDiT_TinyD3": MMDiTConfig(depth=3, num_heads=3, head_dim=64, patch_size=2, pos_embed_max_size=17),
        "MMDiT_TinyD3_Renderer": RendererConfig(depth=3, num_heads=3, head_dim=64, patch_size=2)}
    xl = {"depth": 16, "hidden_size": 64, "patch_size": 2, "num_heads": 4, "query_dim": 512, "query_heads": 8,
          "bidirectional": False}  # Enc_Qformer_Uni_XL_2 in the official encoder registry
    assert official_encoder_config(xl) == official_encoder_presets()["Enc-Qformer-Uni-XL/2"]
    mmdit_xl = {"depth": 24, "patch_size": 2, "pos_embed_max_size": 192}
    assert official_decoder_config(mmdit_xl) == official_decoder_presets()["MMDiT_XL"]
    assert official_decoder_config(mmdit_xl, renderer=True) == official_decoder_presets()["MMDiT_XL_Renderer"]
    with pytest.raises(CheckpointError, match="bidirectional"):
        official_encoder_config({**xl, "bidirectional": True})
    with pytest.raises(CheckpointError, match="not implemented.*'zero_init'"):
        official_encoder_config({**xl, "zero_init": True})
    with pytest.raises(CheckpointError, match="pos_embed_scaling_factor"):
        official_decoder_config({**mmdit_xl, "pos_embed_scaling_factor": 2.0})


def test_official_kwargs_and_an_in_memory_state_dict_give_the_reference_model(tmp_path, state):
    params = fixture_config()["tokenizer_ImageTokenizer_kwargs"]
    enc, dec = registered_presets()
    tok = selftok.from_official_state(params, state, encoder_presets=enc, decoder_presets=dec)
    io = reference_io()
    assert torch.equal(tok.encode_latents(io["enc.x"]), io["enc.indices"])
    # the same model as the file-based loader, through the package's top-level names
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump({"tokenizer": {"params": params}}))
    torch.save(dict(state), tmp_path / "ckpt.pth")
    loaded = selftok.load_official(tmp_path / "ckpt.pth", tmp_path / "cfg.yml", encoder_presets=enc,
                                   decoder_presets=dec)
    assert loaded.state_dict().keys() == tok.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tok.state_dict().values()))
