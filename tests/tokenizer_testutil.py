"""Helpers to load the official reference fixture (tests/fixtures/official/reference: K = 24, 192 px)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selftok.loaders.official import config_from_official, model_from_official_state, read_state_dict
from selftok.model.encoder import EncoderConfig
from selftok.model.mmdit import MMDiTConfig
from selftok.model.renderer import RendererConfig

FIXTURES = Path(__file__).parent / "fixtures" / "official"
REFERENCE = FIXTURES / "reference"


def fixture_config() -> dict:
    return json.loads((REFERENCE / "fixture_config.json").read_text())


def registered_presets() -> tuple[dict, dict]:
    """The presets the reference data added to the official registries, as our configs."""
    enc, dec = {}, {}
    for name, spec in fixture_config()["registered_presets"].items():
        kw = spec["preset_kwargs"]
        if spec["class"] == "QformerEncoder":
            assert kw["bidirectional"] is False
            enc[name] = EncoderConfig(patch_size=kw["patch_size"], hidden_size=kw["hidden_size"],
                                      num_heads=kw["num_heads"], depth=kw["depth"], query_dim=kw["query_dim"],
                                      query_heads=kw["query_heads"])
        elif spec["class"] == "MMDiT":  # official MMDiT: heads = depth, width 64·depth
            dec[name] = MMDiTConfig(depth=kw["depth"], num_heads=kw["depth"], head_dim=64,
                                    patch_size=kw["patch_size"], pos_embed_max_size=kw["pos_embed_max_size"])
    for name, spec in fixture_config()["registered_presets"].items():
        if spec["class"] == "MMDiT_Renderer":  # "same as" the MMDiT preset
            base = next(v for v in dec.values() if isinstance(v, MMDiTConfig))
            dec[name] = RendererConfig(depth=base.depth, num_heads=base.num_heads, head_dim=base.head_dim,
                                       patch_size=base.patch_size)
    return enc, dec


def reference_config(which: str):
    """Our TokenizerConfig for the official kwargs of 'tokenizer' or 'renderer'."""
    return config_from_official(fixture_config()[f"{which}_ImageTokenizer_kwargs"], *registered_presets())


def load_reference_model(which: str):
    """The official reference weights of 'tokenizer' or 'renderer', loaded into our classes."""
    return model_from_official_state(read_state_dict(REFERENCE / f"{which}.safetensors"), reference_config(which))


def reference_io() -> dict:
    return load_file(str(REFERENCE / "io.safetensors"))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: the 2 cores are shared, and oversubscribed OpenMP threads make tiny ops ~100× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
