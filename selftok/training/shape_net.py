"""A shape net for the shapes world: a small conv net on tokenizer latents that predicts which shape covers
each cell of the image. Its features give a shape-sensitive perceptual distance for the renderer loss — the
analogue of LPIPS's ImageNet-trained VGG for this world — because a pixel or latent MSE barely separates a
square from a circle of the same colour and place (the corners are a few percent of the object's pixels),
so an MSE-trained tokenizer encodes position, size and colour first and shape last.

It is trained on the run's own training images (the shapes world's training split, never held-out scenes),
after stage 0 and on the frozen autoencoder's latents, with the labels of `selftok.shapes.shape_map`.
Three distances, (B, C, h, w) pairs → (B,): ``features`` (LPIPS form: every tapped feature map is
unit-normalised over channels; squared differences are averaged over channels and space and summed over taps)
``logits`` (the KL divergence of the prediction's per-cell shape distribution from the target's, averaged
over cells: large when the net reads another shape, whatever the pixel area of the difference) and
``object_logits`` (the same KL averaged over the target's *object* cells, each weighted by the target's
probability that it is not background: in ``logits`` the background, most of every scene, dilutes a small
object's misread shape several-fold).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selftok.shapes import SHAPES, Scene, shape_map

log = logging.getLogger(__name__)

NUM_CLASSES = 1 + len(SHAPES)
"""Background + one class per shape."""
DISTANCES = ("features", "logits", "object_logits")


@dataclass
class ShapeNetConfig:
    """The shape net of the renderer's shape term (``stage1.shape_weight`` / ``stage2.shape_weight``)."""

    steps: int = 0
    """Adam steps; 0 = no shape net."""
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    depth: int = 2
    """Convolutions at the latent grid (each widens the receptive field by one latent cell per side)."""
    map_size: int = 16
    """Side of the predicted label map (a power-of-two multiple of the latent grid)."""
    images: int = 4096
    """Training images (the first of the run's source) it learns from."""
    distance: Literal["features", "logits", "object_logits"] = "features"
    """The renderer term's distance (module docstring)."""
    noise: float = 0.0
    """Training latents get Gaussian noise of a std drawn uniformly from [0, noise] per image, so that the net
    also reads the imperfect latents a renderer in training predicts (a smoother, less exploitable term)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.width < 8 or self.images < 1 or self.depth < 1 \
                or self.noise < 0:
            raise ValueError("shape_net.steps and noise must be >= 0, batch_size, images and depth >= 1, width >= 8")
        if self.distance not in DISTANCES:
            raise ValueError(f"shape_net.distance must be one of {', '.join(DISTANCES)}, not {self.distance!r}")


class ShapeNet(nn.Module):
    """Latents (B, C, L, L) → per-cell shape logits (B, NUM_CLASSES, M, M): `depth` convolutions at the
    latent grid, then one ×2 upsampling stage per doubling up to M. `distance` is the kind `shape_distance`
    computes with it."""

    def __init__(self, channels: int, latent_size: int, width: int = 32, map_size: int = 16, depth: int = 2,
                 distance: str = "features"):
        super().__init__()
        self.distance = distance
        ups = math.log2(map_size / latent_size)
        if ups < 0 or ups != int(ups):
            raise ValueError(f"shape_net.map_size {map_size} must be a power-of-two multiple of the "
                             f"{latent_size}-cell latent grid")

        def block(cin: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU())

        self.blocks = nn.ModuleList([block(channels)] + [block(width) for _ in range(depth - 1)])
        self.blocks.extend(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), block(width))
                           for _ in range(int(ups)))
        self.head = nn.Conv2d(width, NUM_CLASSES, 1)

    def taps(self, latents: Tensor) -> list[Tensor]:
        """The feature map after every block, then the logits."""
        x, out = latents.float(), []
        for blk in self.blocks:
            x = blk(x)
            out.append(x)
        out.append(self.head(x))
        return out

    @classmethod
    def from_config(cls, cfg: ShapeNetConfig, channels: int, latent_size: int) -> ShapeNet:
        return cls(channels, latent_size, cfg.width, cfg.map_size, cfg.depth, cfg.distance)

    def forward(self, latents: Tensor) -> Tensor:
        return self.taps(latents)[-1]


def shape_distance(net: ShapeNet, pred: Tensor, target: Tensor) -> Tensor:
    """The net's distance (``net.distance``, module docstring) of `pred` from `target` latents: (B,)."""
    with torch.autocast(pred.device.type, enabled=False):
        if net.distance != "features":
            with torch.no_grad():
                ref = F.log_softmax(net(target), dim=1)
            kl = (ref.exp() * (ref - F.log_softmax(net(pred), dim=1))).sum(1)
            if net.distance == "logits":
                return kl.mean((1, 2))
            weight = 1 - ref[:, 0].exp()  # class 0 is the background
            return (kl * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1.0)
        with torch.no_grad():
            ref = net.taps(target)
        total = pred.new_zeros(pred.shape[0], dtype=torch.float32)
        for fa, fb in zip(net.taps(pred), ref):
            d = (F.normalize(fa, dim=1, eps=1e-10) - F.normalize(fb, dim=1, eps=1e-10)).pow(2)
            total = total + d.mean((1, 2, 3))
    return total


def label_maps(meta: list[str | None], size: int) -> Tensor:
    """Shape label maps (B, size, size) int64 from the samples' JSON metadata (shapes-world samples carry
    their scene). Raises ValueError when a sample has none."""
    maps = []
    for m in meta:
        scene = json.loads(m).get("scene") if m else None
        if scene is None:
            raise ValueError("the shape net needs shapes-world training data (samples carrying their scene); "
                             "set shape_net.steps: 0 for other data")
        maps.append(np.asarray(shape_map(Scene.from_json(json.dumps(scene)), size), dtype=np.int64))
    return torch.from_numpy(np.stack(maps))


def train_shape_net(cfg: ShapeNetConfig, latents: Tensor, labels: Tensor, seed: int) -> tuple[ShapeNet, dict]:
    """Fit a shape net to (N, C, L, L) latents and (N, M, M) labels (deterministic given `seed`); the last
    eighth of the images is held back to report the pixel accuracy on objects. Returns (net in eval mode,
    metrics)."""
    n_val = max(1, latents.shape[0] // 8)
    train_z, val_z = latents[:-n_val], latents[-n_val:]
    train_y, val_y = labels[:-n_val], labels[-n_val:]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ShapeNet.from_config(cfg, latents.shape[1], latents.shape[-1])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        idx = torch.randint(train_z.shape[0], (cfg.batch_size,), generator=gen)
        z = train_z[idx]
        if cfg.noise:
            sigma = cfg.noise * torch.rand(z.shape[0], 1, 1, 1, generator=gen)
            z = z + sigma * torch.randn(z.shape, generator=gen)
        loss = F.cross_entropy(net(z), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        pred = torch.cat([net(val_z[i:i + 256]).argmax(1) for i in range(0, n_val, 256)])
    objects = val_y > 0
    metrics = {"object_pixel_accuracy": float((pred == val_y)[objects].float().mean()),
               "pixel_accuracy": float((pred == val_y).float().mean()), "final_loss": float(loss.detach()),
               "val_images": n_val}
    log.info("shape net: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return net, metrics
