"""The official 512 / 1024 / renderer architectures, built on the meta device, account for every tensor of
the official state_dict manifests (998 entries each) through the strict key mapping."""
import json
from pathlib import Path

import pytest
import torch
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.loaders.official import map_official_name
from selftok.model.presets import get_preset
from selftok.model.tokenizer import SelftokTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CASES = [("manifest_tokenizer_512.json", "selftok-512", "decoder"),
         ("manifest_tokenizer_1024.json", "selftok-1024", "decoder"),
         ("manifest_renderer_512.json", "selftok-renderer-512", "renderer")]


@pytest.mark.parametrize("manifest,preset,kind", CASES)
def test_meta_build_matches_manifest(manifest, preset, kind):
    entries = json.loads((FIXTURES / manifest).read_text())["state_dict"]
    assert len(entries) == 998
    with torch.device("meta"):
        model = SelftokTokenizer(get_preset(preset))
    ours = model.state_dict()
    part = model.decoder if kind == "decoder" else model.renderer
    covered, ignored = set(), []
    for e in entries:
        name, reason = map_official_name(e["name"], kind, model.cfg.encoder.depth, len(part.joint_blocks))
        if name is None:
            assert reason
            ignored.append(e["name"])
            continue
        assert name in ours, f"{e['name']} maps to {name}, which the model lacks"
        assert list(ours[name].shape) == e["shape"], e["name"]
        assert str(ours[name].dtype).removeprefix("torch.") == e["dtype"], e["name"]
        assert name not in covered, f"two official tensors map to {name}"
        covered.add(name)
    assert covered == set(ours), f"model tensors with no official source: {sorted(set(ours) - covered)}"
    # exactly the documented dead tensors are ignored: diffusion.* (4), final_layer_norm{,2} (4), last encoder
    # block image stream (8), y_embedder (4), last context t_embedder (4) [+ renderer model.pos_embed]
    assert len(ignored) == 24 + (kind == "renderer")


def test_parameter_count_matches_manifest():
    manifest = json.loads((FIXTURES / "manifest_tokenizer_512.json").read_text())
    with torch.device("meta"):
        model = SelftokTokenizer(get_preset("selftok-512"))
    n_params = sum(p.numel() for p in model.parameters())
    # ours lacks only the dead parameters (last encoder block image stream, final_layer_norm{,2},
    # y_embedder, last context t_embedder) and holds encoder.pos_embed as a buffer instead of a parameter
    dead = 0
    for e in manifest["state_dict"]:
        name, _ = map_official_name(e["name"], "decoder", 16, 24)
        if name is None and e["kind"] == "parameter":
            dead += e["numel"]
    pos = 4096 * 64
    assert n_params == manifest["counts"]["total"]["parameters"] - dead - pos
