"""Loading the official Selftok release (``selftok-team/SelftokTokenizer``): checkpoints and YAML configs.

The official ``ImageTokenizer`` state_dict has three prefixes: ``encoder.*`` (Q-Former, with the quantizer
under ``encoder.quantizer.*`` and the code post-norm as ``encoder.final_layer_norm3``), ``model.*`` (the
MMDiT decoder or the renderer) and ``diffusion.*`` (sampler schedule buffers). `map_official_name` maps each
name to this package's layout or to a documented reason for ignoring it; `map_official_state_dict` applies
it and fails — naming every tensor — on missing, unexpected or mis-shaped tensors. Nothing is dropped
silently: the only tensors not loaded are the dead ones listed in `IGNORED` (they affect no output).

Checkpoints are read with ``torch.load(weights_only=True)`` (memory-mapped when possible) or safetensors, and
must be a plain ``{name: tensor}`` state dict.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from selftok.model.encoder import EncoderConfig
from selftok.model.latents import LatentConfig
from selftok.model.mmdit import MMDiTConfig
from selftok.model.presets import official_tokenizer
from selftok.model.quantizer import QuantizerConfig
from selftok.model.renderer import RendererConfig
from selftok.model.schedule import ScheduleConfig
from selftok.model.tokenizer import SelftokTokenizer, TokenizerConfig

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """An official checkpoint or config that cannot be loaded faithfully."""


#: Official tensors that are deliberately not loaded, as (pattern, reason). ``{E}``/``{D}`` stand for the
#: index of the last encoder / decoder block.
IGNORED: tuple[tuple[str, str], ...] = (
    (r"diffusion\..*", "sampler schedule buffers; the sampler builds its own grid"),
    (r"encoder\.final_layer_norm\..*", "unused (pre_norm is False)"),
    (r"encoder\.final_layer_norm2\..*", "unused by the official forward"),
    (r"encoder\.blocks\.{E}\.(attn\.qkv|attn\.proj|mlp)\..*", "image stream of the last encoder block feeds nothing"),
    (r"model\.y_embedder\..*", "pooled-vector embedder, unused (sd3_cond_pooling is None)"),
    (r"model\.joint_blocks\.{D}\.context_block\.t_embedder\..*",
     "timestep embedder of the pre-only last context block, unused (it is modulated by the time embedding)"),
)
#: Renderer only: the decoder position table is stored but never read.
IGNORED_RENDERER: tuple[tuple[str, str], ...] = ((r"model\.pos_embed", "renderer never reads the decoder position table"),)

_RENAMES = (
    ("encoder.quantizer._codebook.", "quantizer.codebook."),
    ("encoder.quantizer.", "quantizer."),
    ("encoder.final_layer_norm3.", "quantizer.post_norm."),
)

#: Official encoder presets this package implements (dual mode, uni-directional, no zero-init gate).
OFFICIAL_ENCODERS: dict[str, tuple[int, int, int, int, int, int]] = {
    # name: (patch_size, hidden_size, num_heads, depth, query_dim, query_heads)
    "Enc-Qformer-Uni-M/2": (2, 64, 4, 16, 64, 4),
    "Enc-Qformer-Uni-L/2": (2, 64, 4, 20, 128, 8),
    "Enc-Qformer-Uni-XL/2": (2, 64, 4, 16, 512, 8),
    "Enc-Qformer-Uni-XL/1": (1, 64, 4, 24, 256, 8),
    "Enc-Qformer-Uni-L2/2": (2, 128, 4, 24, 128, 4),
    "Enc-Qformer-Uni-WL/2": (2, 128, 4, 24, 256, 8),
    "Enc-Qformer-Uni-WL/1": (1, 128, 4, 24, 256, 8),
    "Enc-Qformer-Uni-UWL/1": (1, 256, 8, 24, 256, 8),
    "Enc-Qformer-Uni-WXL/1": (1, 256, 4, 28, 256, 4),
    "Enc-Qformer-Uni-WXL/2": (2, 256, 4, 28, 256, 4),
    "Enc-Qformer-Uni-WXL/3": (1, 256, 4, 28, 512, 4),
    "Enc-Qformer-Uni-WXL/4": (2, 256, 4, 28, 512, 4),
    "Enc-Qformer-Uni-WXL/5": (2, 256, 4, 28, 512, 8),
}


def official_encoder_presets() -> dict[str, EncoderConfig]:
    return {name: EncoderConfig(patch_size=p, hidden_size=h, num_heads=nh, depth=d, query_dim=q, query_heads=qh)
            for name, (p, h, nh, d, q, qh) in OFFICIAL_ENCODERS.items()}


def official_decoder_presets() -> dict[str, MMDiTConfig | RendererConfig]:
    return {"MMDiT_XL": MMDiTConfig(depth=24, num_heads=24, head_dim=64, pos_embed_max_size=192),
            "MMDiT_XL_Renderer": RendererConfig(depth=24, num_heads=24, head_dim=64)}


#: ``DiT_models`` kwargs that size nothing here: derived from other settings, or the run's device and dtype.
_DERIVED_DIT_KWARGS = ("num_patches", "adm_in_channels", "context_embedder_config", "device", "dtype")


def official_encoder_config(kwargs: Mapping[str, Any]) -> EncoderConfig:
    """The encoder of an official ``Enc_models`` entry, from the kwargs it passes to ``QformerEncoder``
    (e.g. ``patch_size=2, hidden_size=64, num_heads=4, depth=16, query_dim=512, query_heads=8,
    bidirectional=False``). Register it under its name through `load_official` / `from_official_state`'s
    `encoder_presets`. Only the uni-directional Q-Former is implemented; other keys raise CheckpointError."""
    kw = dict(kwargs)
    if kw.pop("bidirectional", False):
        raise CheckpointError("bidirectional Q-Former encoders (Enc-Qformer-Bi-*) are not implemented")
    sizes = ("patch_size", "hidden_size", "num_heads", "depth", "query_dim", "query_heads")
    missing, unknown = [k for k in sizes if k not in kw], sorted(set(kw) - set(sizes))
    if missing or unknown:
        raise CheckpointError(f"QformerEncoder kwargs: missing {missing}, not implemented {unknown}")
    return EncoderConfig(**{k: int(kw[k]) for k in sizes})


def official_decoder_config(kwargs: Mapping[str, Any],
                            renderer: bool = False) -> MMDiTConfig | RendererConfig:
    """The decoder of an official ``DiT_models`` entry, from the kwargs it passes to ``MMDiT`` (or, with
    `renderer`, to ``MMDiT_Renderer``, which takes the same ones): ``depth``, ``patch_size`` and
    ``pos_embed_max_size``. The official MMDiT has ``depth`` heads of width 64 (width 64·depth); the renderer
    reads no position table. Register it under its name through `decoder_presets`."""
    kw = {k: v for k, v in kwargs.items() if k not in _DERIVED_DIT_KWARGS}
    for key in ("pos_embed_scaling_factor", "pos_embed_offset"):
        if kw.pop(key, None) is not None:
            raise CheckpointError(f"MMDiT kwargs: {key} is not implemented (only None)")
    if "depth" not in kw or sorted(set(kw) - {"depth", "patch_size", "pos_embed_max_size"}):
        raise CheckpointError(f"MMDiT kwargs need depth and take patch_size and pos_embed_max_size; "
                              f"got {sorted(kw)}")
    depth, patch = int(kw["depth"]), int(kw.get("patch_size", 2))
    if renderer:
        return RendererConfig(depth=depth, num_heads=depth, head_dim=64, patch_size=patch)
    table = kw.get("pos_embed_max_size")
    return MMDiTConfig(depth=depth, num_heads=depth, head_dim=64, patch_size=patch,
                       pos_embed_max_size=None if table is None else int(table))


# ----------------------------------------------------------------------------- key mapping
def map_official_name(name: str, kind: str, encoder_depth: int, decoder_depth: int) -> tuple[str | None, str]:
    """Map one official state_dict name. kind: ``"decoder"`` or ``"renderer"`` (what ``model.*`` holds).

    Returns (our name, "") or (None, reason it is deliberately ignored)."""
    patterns = IGNORED + (IGNORED_RENDERER if kind == "renderer" else ())
    for pattern, reason in patterns:
        if re.fullmatch(pattern.replace("{E}", str(encoder_depth - 1)).replace("{D}", str(decoder_depth - 1)), name):
            return None, reason
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):], ""
    if name.startswith("model."):
        return f"{kind}.{name[len('model.'):]}", ""
    return name, ""


def checkpoint_kind(state: Mapping[str, Tensor]) -> str:
    """``"decoder"`` if ``model.*`` is the diffusion MMDiT, ``"renderer"`` if it is the one-step renderer."""
    if "model.mask_token" in state:
        return "renderer"
    if "model.x_embedder.proj.weight" in state:
        return "decoder"
    raise CheckpointError("not an official Selftok checkpoint: it has neither model.x_embedder.proj.weight "
                          "(diffusion decoder) nor model.mask_token (renderer)")


def map_official_state_dict(state: Mapping[str, Tensor], model: SelftokTokenizer) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Map an official state dict onto `model` (any device, including meta) strictly.

    Floating tensors are converted to the model's dtype (e.g. float8-stored reference weights → float32).
    Returns (our state dict, {ignored official name: reason}). Raises CheckpointError naming every missing,
    unexpected and mis-shaped tensor."""
    kind = checkpoint_kind(state)
    part = model.decoder if kind == "decoder" else model.renderer
    if part is None:
        raise CheckpointError(f"the checkpoint holds a {kind} but the config builds none ({kind}: null)")
    expected = model.state_dict()
    mapped: dict[str, Tensor] = {}
    ignored: dict[str, str] = {}
    unexpected, shapes = [], []
    for name, tensor in state.items():
        ours, reason = map_official_name(name, kind, model.cfg.encoder.depth, len(part.joint_blocks))
        if ours is None:
            ignored[name] = reason
        elif ours not in expected:
            unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[ours].shape):
            shapes.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[ours].shape)}")
        else:
            target = expected[ours].dtype
            mapped[ours] = tensor.to(target) if tensor.dtype != target and tensor.is_floating_point() else tensor
    other = "renderer" if kind == "decoder" else "decoder"
    missing = sorted(k for k in expected if k not in mapped and not k.startswith(other + "."))
    problems = [f"{len(missing)} missing: {', '.join(missing)}"] if missing else []
    problems += [f"{len(unexpected)} unexpected: {', '.join(sorted(unexpected))}"] if unexpected else []
    problems += [f"{len(shapes)} mis-shaped: {'; '.join(sorted(shapes))}"] if shapes else []
    if problems:
        raise CheckpointError("official checkpoint does not match the configured architecture: " + " | ".join(problems))
    return mapped, ignored


# ----------------------------------------------------------------------------- reading files
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a plain ``{name: tensor}`` state dict from ``.safetensors`` or a torch pickle (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is not a plain state dict: torch.load(weights_only=True) refused it "
                              f"(it pickles objects other than tensors and containers): {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict ({{name: tensor}})")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        hint = (" — it looks like a training checkpoint; save its 'state_dict' entry on its own"
                if "state_dict" in obj else "")
        raise CheckpointError(f"{path} is not a plain state dict: entries that are not tensors: "
                              f"{', '.join(bad[:20])}{' …' if len(bad) > 20 else ''}{hint}")
    return dict(obj)


def read_official_yaml(path: str | Path) -> dict[str, Any]:
    """The ``tokenizer.params`` mapping of an official YAML config (``None`` stays the string 'None')."""
    data = yaml.safe_load(Path(path).read_text())
    try:
        params = data["tokenizer"]["params"]
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path} has no tokenizer.params section (not an official Selftok config)") from e
    return dict(params)


# ----------------------------------------------------------------------------- configs
def _csv(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in str(value).split(",")) if not isinstance(value, (list, tuple)) else tuple(value)


def _none(value: Any) -> bool:
    return value is None or value == "None"


def config_from_official(params: Mapping[str, Any], encoder_presets: Mapping[str, EncoderConfig] | None = None,
                         decoder_presets: Mapping[str, MMDiTConfig | RendererConfig] | None = None,
                         vae_path: str | None = None) -> TokenizerConfig:
    """TokenizerConfig from official ``ImageTokenizer`` kwargs (``tokenizer.params`` of the YAML).

    `encoder_presets` / `decoder_presets` add architectures to the official registries (name → sizes).
    Settings this package does not implement raise CheckpointError naming the key."""
    encs = {**official_encoder_presets(), **(encoder_presets or {})}
    decs = {**official_decoder_presets(), **(decoder_presets or {})}
    p = dict(params)
    enc_cfg, dec_cfg = dict(p.get("encoder_config", {})), dict(p.get("decoder_config", {}))
    q = dict(p["quantizer_config"])
    unsupported = {
        "diffusion_type": p.get("diffusion_type", "flow") != "flow",
        "stages (DiTi_normal with k_m/k_s)": p.get("stages") is None,
        "encoder_config.qformer_mode": enc_cfg.get("qformer_mode", "dual") != "dual",
        "encoder_config.time_adaln": enc_cfg.get("time_adaln") is not True,
        "encoder_config.pre_norm": bool(enc_cfg.get("pre_norm", False)),
        "encoder_config.qk_norm": bool(enc_cfg.get("qk_norm", False)),
        "encoder_config.attn_mask": bool(enc_cfg.get("attn_mask", False)),
        "decoder_config.sd3_cond_pooling": not _none(dec_cfg.get("sd3_cond_pooling")),
        "decoder_config.time_adaln": dec_cfg.get("time_adaln") != "pos_emb",
        "quantizer_config.use_fsq": bool(q.get("use_fsq", False)),
        "in_channels": int(p.get("in_channels", 16)) != 16,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"unsupported official settings: {', '.join(bad)}")
    if p["enc"] not in encs:
        raise CheckpointError(f"unsupported official encoder preset {p['enc']!r}; supported: {', '.join(sorted(encs))}")
    if p["model"] not in decs:
        raise CheckpointError(f"unsupported official decoder preset {p['model']!r}; supported: {', '.join(sorted(decs))}")
    image_size, K = int(p["image_size"]), int(p["k"])
    if "K" in q and int(q["K"]) != K:
        raise CheckpointError(f"quantizer_config.K = {q['K']} disagrees with k = {K}")
    encoder = EncoderConfig(**vars(encs[p["enc"]]))
    encoder.pos_embed_max_size = None if p.get("enable_enc_variable_size", False) else (image_size // 8) // encoder.patch_size
    model = decs[p["model"]]
    renderer = isinstance(model, RendererConfig)
    if renderer:
        model = RendererConfig(**{**vars(model), "repeat_mask_token": bool(dec_cfg.get("repeat", False))})
    elif p.get("context_see_xt") is False:
        log.warning("context_see_xt is False in the config; the official pipeline decodes with True, as here")
    return TokenizerConfig(
        image_size=image_size,
        latent=LatentConfig(kind="sd3_vae", path=vae_path),
        schedule=ScheduleConfig(K=K, stages=_csv(p["stages"]), k_per_stage=_csv(p["k_per_stage"])),
        encoder=encoder,
        quantizer=QuantizerConfig(
            codebook_size=int(q["codebook_size"]), code_dim=int(q["code_dim"]),
            output_dim=int(p["encoder_hidden_size"]) if int(p["encoder_hidden_size"]) != int(q["code_dim"]) else None,
            post_norm=bool(enc_cfg.get("post_norm", True)), smart_react=bool(q.get("smart_react", False)),
            decay=float(q.get("decay", 0.99)), w_commit=float(q.get("w_commit", 1.0)),
            w_diversity=float(q.get("w_diversity", 0.0)),
            dead_code_threshold=float(q.get("dead_code_threshold", 0.0)),
            reset_cluster_size=float(q.get("reset_cluster_size") or q.get("dead_code_threshold", 0.0)),
            ema_entropy_ratio=float(q.get("ema_entropy_ratio", 0.7)), reg=tuple(q.get("reg", (0.25, 0.5)))),
        decoder=None if renderer else model,
        renderer=model if renderer else None,
    )


def infer_official_config(state: Mapping[str, Tensor], vae_path: str | None = None) -> TokenizerConfig:
    """Official architecture for a checkpoint without its YAML: K from ``encoder.query_tokens``, image size
    from the encoder position table, decoder or renderer from the keys. Only the released structure
    (Uni-XL/2 + MMDiT-XL) is inferred; anything else needs the YAML."""
    kind = checkpoint_kind(state)
    K = int(state["encoder.query_tokens"].shape[1])
    if kind == "decoder" and K not in (512, 1024):
        raise CheckpointError(f"cannot infer the token schedule of a K = {K} checkpoint; pass its YAML config")
    cfg = official_tokenizer(K if K in (512, 1024) else 512, renderer=kind == "renderer")
    if kind == "renderer":
        cfg.schedule = ScheduleConfig.linear(K)
        cfg.renderer.repeat_mask_token = state["model.mask_token"].shape[1] == 1
    if K == 1024 and kind == "decoder":
        log.warning("no official K=1024 config exists; assuming the stage split 384,368,144,96,32")
    grid = round(state["encoder.pos_embed"].shape[1] ** 0.5)
    cfg.image_size = grid // 2 * 8  # the encoder table spans twice the latent side
    cfg.latent.path = vae_path
    cfg.__post_init__()  # re-check the invariants after the edits
    return cfg


def load_official(ckpt_path: str | Path, yaml_path: str | Path | None = None, vae_path: str | None = None,
                  encoder_presets: Mapping[str, EncoderConfig] | None = None,
                  decoder_presets: Mapping[str, MMDiTConfig | RendererConfig] | None = None) -> SelftokTokenizer:
    """An official checkpoint (``tokenizer_*_ckpt.pth`` or ``renderer_*_ckpt.pth``) as a SelftokTokenizer.

    The architecture comes from the official YAML if given, else it is inferred (released structure only).
    Weights are memory-mapped and assigned without copies where the dtype already matches."""
    state = read_state_dict(ckpt_path)
    if yaml_path is not None:
        params = read_official_yaml(yaml_path)
        model = from_official_state(params, state, encoder_presets, decoder_presets, vae_path)
    else:
        model = model_from_official_state(state, infer_official_config(state, vae_path))
    log.info("loaded official checkpoint %s", ckpt_path)
    return model


def from_official_state(params: Mapping[str, Any], state: Mapping[str, Tensor],
                        encoder_presets: Mapping[str, EncoderConfig] | None = None,
                        decoder_presets: Mapping[str, MMDiTConfig | RendererConfig] | None = None,
                        vae_path: str | None = None) -> SelftokTokenizer:
    """A SelftokTokenizer from official ``ImageTokenizer`` kwargs (`params`, the YAML's ``tokenizer.params``)
    and an official state dict held in memory, e.g. an official model's ``state_dict()``; no file is read.
    `encoder_presets` / `decoder_presets` register non-release architectures (`official_encoder_config`,
    `official_decoder_config`). Loading is strict, as in `load_official`."""
    cfg = config_from_official(params, encoder_presets, decoder_presets, vae_path)
    return model_from_official_state(state, cfg)


def load_tokenizer(path: str | Path, official_yaml: str | Path | None = None,
                   vae_path: str | None = None) -> SelftokTokenizer:
    """A tokenizer from a `save_pretrained` folder or from an official ``.pth`` file (with its YAML)."""
    if Path(path).is_dir():
        return SelftokTokenizer.from_pretrained(path, vae_path=vae_path)
    return load_official(path, yaml_path=official_yaml, vae_path=vae_path)


def model_from_official_state(state: Mapping[str, Tensor], cfg: TokenizerConfig) -> SelftokTokenizer:
    """Build `cfg` on the meta device and assign the mapped official tensors (strict; see the module doc)."""
    with torch.device("meta"):
        model = SelftokTokenizer(cfg)
    mapped, ignored = map_official_state_dict(state, model)
    model.load_state_dict(mapped, strict=False, assign=True)  # strictness checked above (other part absent)
    leftover = [k for k, v in model.state_dict().items() if v.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left unloaded: {', '.join(leftover)}")
    log.info("mapped %d official tensors; ignored %d dead ones", len(mapped), len(ignored))
    return model.eval()
