"""Helpers to load the official reference fixture (tests/fixtures/official/reference: K = 24, 192 px)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selftok.loaders.official import (
    config_from_official,
    model_from_official_state,
    official_decoder_config,
    official_encoder_config,
    read_state_dict,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official"
REFERENCE = FIXTURES / "reference"


def fixture_config() -> dict:
    return json.loads((REFERENCE / "fixture_config.json").read_text())


def registered_presets() -> tuple[dict, dict]:
    """The presets the reference data added to the official registries, as our configs (translated by the
    package's `official_encoder_config` / `official_decoder_config`)."""
    enc, dec, kwargs = {}, {}, {}
    for name, spec in fixture_config()["registered_presets"].items():
        if spec["class"] == "QformerEncoder":
            enc[name] = official_encoder_config(spec["preset_kwargs"])
        elif spec["class"] == "MMDiT":
            kwargs[name] = spec["preset_kwargs"]
            dec[name] = official_decoder_config(spec["preset_kwargs"])
    for name, spec in fixture_config()["registered_presets"].items():
        if spec["class"] == "MMDiT_Renderer":  # "same as MMDiT_TinyD3": the MMDiT preset's kwargs
            same_as = spec["preset_kwargs"].removeprefix("same as ")
            dec[name] = official_decoder_config(kwargs[same_as], renderer=True)
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
