"""An LPIPS-style perceptual distance on a VGG16 backbone, loaded only from local weights.

Nothing is downloaded. The weights file (``.safetensors`` or ``.pth``) holds torchvision's VGG16
``features.*`` tensors and, optionally, LPIPS's linear heads ``lin{0..4}.model.1.weight`` (shape (1, C, 1, 1));
to build it, load torchvision's ``vgg16`` state dict and LPIPS's ``vgg.pth`` and save their union. Without
the heads every channel weighs the same (a plain "VGG feature distance"); with them the value is LPIPS(vgg).

Distance: inputs in [0, 1] → [−1, 1] → LPIPS scaling layer → relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
each feature map is unit-normalised over channels, squared differences are weighted per channel (heads) or
averaged, averaged over space, and summed over the five layers. Returns (B,).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: VGG16 conv widths, "M" = max-pool (torchvision ``cfgs['D']``).
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: torchvision ``features`` indices of the ReLUs LPIPS taps.
TAPS = (3, 8, 15, 22, 29)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers)


class PerceptualDistance(nn.Module):
    """LPIPS-style distance (frozen). forward(a, b): (B, 3, H, W) in [0, 1] → (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ParameterList([nn.Parameter(torch.ones(1, c, 1, 1) / c) for c in (64, 128, 256, 512, 512)])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: Tensor) -> list[Tensor]:
        x = ((x * 2 - 1) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        total = a.new_zeros(a.shape[0])
        for fa, fb, w in zip(self.taps(a), self.taps(b), self.heads):
            d = (F.normalize(fa, dim=1, eps=1e-10) - F.normalize(fb, dim=1, eps=1e-10)).pow(2)
            total = total + (d * w).sum(1).mean((1, 2))
        return total


def load_perceptual(path: str | Path) -> PerceptualDistance:
    """Build the distance and load `path` strictly for the backbone (every ``features.*`` conv tensor) and,
    when present, the LPIPS heads. Raises ValueError naming missing / mis-shaped / unexpected tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual weights not found at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = PerceptualDistance()
    mine = model.state_dict()
    backbone = {k for k in mine if k.startswith("features.")}
    heads = {f"lin{i}.model.1.weight": f"heads.{i}" for i in range(5)}
    problems = [f"missing {k}" for k in sorted(backbone - set(state))]
    problems += [f"unexpected {k}" for k in sorted(set(state) - backbone - set(heads))]
    problems += [f"{k}: file {tuple(state[k].shape)} vs model {tuple(mine[k].shape)}"
                 for k in sorted(backbone & set(state)) if state[k].shape != mine[k].shape]
    present = [k for k in heads if k in state]
    if present and len(present) != len(heads):
        problems.append(f"LPIPS heads incomplete: found {present}")
    problems += [f"{k}: file {tuple(state[k].shape)} vs model {tuple(mine[heads[k]].shape)}"
                 for k in present if state[k].shape != mine[heads[k]].shape]
    if problems:
        raise ValueError(f"{path}: not VGG16 (+LPIPS) weights: " + "; ".join(problems))
    with torch.no_grad():
        for k in backbone:
            mine[k].copy_(state[k])
        for k in present:
            mine[heads[k]].copy_(state[k])
    return model
