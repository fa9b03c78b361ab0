"""The tokenizer's training stages as modules: the objective accelerate wraps in each stage (stage 0: the
learned autoencoder; stage 1: encoder + quantizer + diffusion decoder; stage 2: the one-step renderer), the
optimizer parameter groups of each stage, which parts train in which stage, and the renderer's start from the
decoder. The recipe that runs them is `selftok.train`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from selftok.model import flow
from selftok.model.layers import crop_pos_embed
from selftok.model.tokenizer import SelftokTokenizer
from selftok.training import objectives
from selftok.training.shape_net import ShapeNet, shape_distance


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule of one stage (official: betas 0.9/0.99, no decay, constant LR)."""

    lr: float = 5e-5
    """Stage 1: encoder + quantizer LR (official ``init_lr``). Stage 2: the renderer's token stream and
    everything else not in the image stream."""
    image_lr: float = 1e-5
    """Decoder/renderer image stream (``x_block*``, ``x_embedder*``, renderer mask token and positional
    embedding) — official ``dit_lr``."""
    token_lr: float = 5e-5
    """Stage 1: the rest of the decoder (context stream, embedders, final layer) — official ``token_lr``."""
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up from 0 (the official recipe has none)."""
    decay: Literal["constant", "cosine", "linear"] = "constant"
    """LR after warm-up: constant (official) or decayed to `final_lr_fraction` at the last step."""
    final_lr_fraction: float = 0.1
    grad_clip: float = 0.0
    """Clip the global grad norm to this value; 0 = off (official)."""

    def __post_init__(self) -> None:
        if min(self.lr, self.image_lr, self.token_lr) < 0 or self.warmup_steps < 0:
            raise ValueError("learning rates and warmup_steps must be non-negative")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction}")


def is_image_stream(name: str) -> bool:
    """Decoder/renderer parameters of the image stream (official ``dit_lr`` group)."""
    return (name.startswith(("x_embedder.", "mask_token", "positional_embedding")) or ".x_block." in name)


def stage1_param_groups(tok: SelftokTokenizer, optim: OptimConfig, joint_renderer: bool = False) -> list[dict]:
    """Encoder + quantizer (lr), decoder image stream (image_lr), rest of the decoder (token_lr); with
    `joint_renderer` the renderer's streams join the decoder's groups."""
    image, token = [], []
    parts = [tok.decoder] + ([tok.renderer] if joint_renderer else [])
    for name, p in (item for part in parts for item in part.named_parameters()):
        (image if is_image_stream(name) else token).append(p)
    encoder = list(tok.encoder.parameters()) + list(tok.quantizer.parameters())
    return [{"name": "encoder", "params": encoder, "lr": optim.lr},
            {"name": "decoder_image", "params": image, "lr": optim.image_lr},
            {"name": "decoder_token", "params": token, "lr": optim.token_lr}]


def stage0_param_groups(tok: SelftokTokenizer, optim: OptimConfig) -> list[dict]:
    """The autoencoder (lr)."""
    return [{"name": "autoencoder", "params": list(tok.latents.parameters()), "lr": optim.lr}]


def stage2_param_groups(tok: SelftokTokenizer, optim: OptimConfig) -> list[dict]:
    """Renderer image stream (image_lr) and the rest of the renderer (lr)."""
    image, rest = [], []
    for name, p in tok.renderer.named_parameters():
        (image if is_image_stream(name) else rest).append(p)
    return [{"name": "renderer_image", "params": image, "lr": optim.image_lr},
            {"name": "renderer_token", "params": rest, "lr": optim.lr}]


def renderer_matches_decoder(tok: SelftokTokenizer) -> bool:
    """Whether the renderer has the decoder's width and patch size (so it can start from the decoder)."""
    r, d = tok.renderer.cfg, tok.decoder.cfg
    return (r.hidden_size, r.patch_size) == (d.hidden_size, d.patch_size)


def renderer_init_from_decoder(renderer: nn.Module, decoder: nn.Module) -> list[str]:
    """Copy the decoder weights the renderer shares (time and context embedders, joint blocks, final layer).

    The decoder's final layer predicts the velocity ε − x0; at t = 1 from x_t = 0 its clean-latent estimate
    is x_t − t·v = −v, so the renderer's final linear is the decoder's negated (it starts as the decoder's
    one-step x0 guess instead of its opposite). The image-stream input (mask token, positional embedding)
    has no decoder counterpart; it starts from the decoder's position table. Returns the copied names."""
    src = decoder.state_dict()
    dst = renderer.state_dict()
    copied = []
    for name, value in dst.items():
        if name in src and src[name].shape == value.shape and name not in ("pos_embed",):
            value.copy_(src[name])
            copied.append(name)
    with torch.no_grad():
        renderer.final_layer.linear.weight.neg_()
        renderer.final_layer.linear.bias.neg_()
        grid = renderer.grid
        table = crop_pos_embed(decoder.pos_embed, decoder.grid, grid, grid)[0]
        renderer.positional_embedding.copy_(table.to(renderer.positional_embedding.dtype))
        renderer.mask_token.copy_(decoder.x_embedder.proj.bias.to(renderer.mask_token.dtype).expand_as(renderer.mask_token))
    return copied


# ------------------------------------------------------------------------------------------------ trained modules
class Stage0Objective(nn.Module):
    """The learned autoencoder's reconstruction loss on pixels; wrapped by accelerate in stage 0."""

    def __init__(self, tok: SelftokTokenizer, mse_weight: float, l1_weight: float):
        super().__init__()
        self.tok = tok
        self.weights = {"mse": mse_weight, "l1": l1_weight}

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, float]]:
        """images (B, 3, H, W) in [0, 1] → (loss, terms)."""
        diff = self.tok.latents.reconstruct(images) - (images.float() * 2 - 1)
        terms = {"mse": diff.pow(2).mean(), "l1": diff.abs().mean()}
        loss = sum(self.weights[k] * v for k, v in terms.items())
        return loss, {k: float(v.detach()) for k, v in terms.items()}


class Stage1Objective(nn.Module):
    """Encoder → quantizer (training path) → decoder velocity loss (+ the optional joint renderer loss); the
    module accelerate wraps in stage 1."""

    def __init__(self, tok: SelftokTokenizer, seed: int, renderer_weight: float = 0.0,
                 shape_net: ShapeNet | None = None, shape_weight: float = 0.0):
        super().__init__()
        self.tok = tok
        self.seed = seed
        self.renderer_weight = renderer_weight
        self.shape_net = shape_net if shape_weight else None
        self.shape_weight = shape_weight

    def forward(self, latents: Tensor, fb: objectives.FlowBatch, mix: float,
                shape_factor: float = 1.0) -> tuple[Tensor, Tensor, dict]:
        """latents (B, C, H, W) → (loss, per-sample velocity MSE (B,) detached, metrics); `shape_factor`
        scales the shape term (its late start, `objectives.delayed_ramp`)."""
        tok = self.tok
        q = tok.quantizer(tok.encoder(latents), mix=mix, seed=self.seed)
        visible = fb.visible
        vectors = q.vectors * visible[..., None].to(q.vectors.dtype)
        x_t = flow.interpolate(latents, fb.noise, fb.t_model)
        v = tok.decoder(x_t, fb.t_model, vectors, visible)
        per_sample = flow.flow_loss(v, latents, fb.noise)
        loss, metrics = per_sample.mean() + q.loss, dict(q.metrics)
        if self.renderer_weight:
            render = tok.renderer(q.vectors.to(latents.dtype)).float()
            render_mse = (render - latents.float()).pow(2).mean()
            loss = loss + self.renderer_weight * render_mse
            metrics["renderer_mse"] = float(render_mse.detach())
            if self.shape_net is not None and shape_factor > 0:
                shape = shape_distance(self.shape_net, render, latents).mean()
                loss = loss + shape_factor * self.shape_weight * shape
                metrics["renderer_shape"] = float(shape.detach())
        return loss, per_sample.detach(), metrics


class Stage2Objective(nn.Module):
    """Frozen encoder + codebook → renderer prediction of the clean latent; wrapped by accelerate in stage 2."""

    def __init__(self, tok: SelftokTokenizer):
        super().__init__()
        self.tok = tok

    def forward(self, latents: Tensor) -> Tensor:
        """latents (B, C, H, W) → predicted clean latents (B, C, H, W)."""
        with torch.no_grad():
            features = self.tok.encoder(latents)
            indices = self.tok.quantizer.lookup(self.tok.quantizer.normalized_inputs(features))
            vectors = self.tok.quantizer.codes_to_vectors(indices)
        return self.tok.renderer(vectors.to(latents.dtype))


def set_stage_modes(tok: SelftokTokenizer, stage: str, joint_renderer: bool = False) -> None:
    """Trainable parts in train mode with gradients, frozen parts in eval mode without (EMA updates of the
    codebook only happen in train mode, so stage 2 never changes it). `joint_renderer`: stage 1 also
    trains the renderer (``stage1.renderer_weight``)."""
    train = {"stage0": ("latents",),
             "stage1": ("encoder", "quantizer", "decoder") + (("renderer",) if joint_renderer else ()),
             "stage2": ("renderer",)}[stage]
    for name in ("latents", "encoder", "quantizer", "decoder", "renderer"):
        part = getattr(tok, name)
        if isinstance(part, nn.Module):
            part.train(name in train)
            part.requires_grad_(name in train)
