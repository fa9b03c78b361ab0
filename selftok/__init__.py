"""Selftok: a discrete image tokenizer whose tokens follow the reverse diffusion process (arXiv 2505.07538).

Shape letters used across the project: B batch, K tokens per image, N image patches, L sequence length,
V vocabulary, G group size, C/H/W latent channels/height/width. Flow time t = 1 is pure noise, t = 0 clean.


Layout: `selftok.model` (the tokenizer), `selftok.loaders` (official and SD3 weights), `selftok.data` (images,
sources, token shards), `selftok.training`, `selftok.runtime` (configs, command line, runs; shared by vlm and
rl), `selftok.shapes` (the shapes world); `selftok.train`, `selftok.pretokenize` and `selftok.reconstruct`
are the recipes.
"""
import importlib

# The tokenizer API is imported on first use, so that `selftok.shapes` and `selftok.runtime` stay torch-free.
_PUBLIC = {
    "SelftokTokenizer": "selftok.model.tokenizer",
    "TokenizerConfig": "selftok.model.tokenizer",
    "get_preset": "selftok.model.presets",
    "load_official": "selftok.loaders.official",
    "from_official_state": "selftok.loaders.official",
    "official_encoder_config": "selftok.loaders.official",
    "official_decoder_config": "selftok.loaders.official",
    "load_tokenizer": "selftok.loaders.official",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'selftok' has no attribute {name!r}")
