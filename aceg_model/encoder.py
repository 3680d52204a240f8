"""Convolutional patch encoder: a grey image to one feature vector per 8x8 patch.

The paper uses DINOv2; its weights cannot be fetched here, so this encoder is
trained in our own pre-training (``aceg_model.pretrain``). It works on grey
images normalized per image (zero mean, unit std) so global gain and offset
changes of the query (darker, brighter, exposure) do not reach the features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 8  # output stride in pixels; patch (i, j) covers pixels [8j, 8j+8) x [8i, 8i+8)


@dataclass
class EncoderConfig:
    channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 3x3 conv each: 1/2, 1/4, 1/8
    dilations: tuple[int, ...] = (1, 2, 1, 2)  # one bottleneck residual block each, at stride 8
    bottleneck: int = 64  # inner width of the residual blocks
    out_dim: int = 128

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        """From a checkpoint's JSON metadata (where tuples come back as lists)."""
        return cls(**dict(d, channels=tuple(d["channels"]), dilations=tuple(d["dilations"])))

    # About 0.45 GMAC per 240x320 image: every block works at stride 8, and the
    # dilated 3x3s widen the receptive field to ~110 px without full-width cost.


class ResBlock(nn.Module):
    """Bottleneck residual block: 1x1 down, dilated 3x3, 1x1 up."""

    def __init__(self, c: int, mid: int, dilation: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, mid, 1)
        self.conv = nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation)
        self.expand = nn.Conv2d(mid, c, 1)
        for m in (self.reduce, self.conv):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
        # A small last-layer init keeps each block close to identity at the start;
        # FINDINGS.md: default init shrank activations until the features died.
        nn.init.normal_(self.expand.weight, std=1e-3)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(F.relu(self.conv(F.relu(self.reduce(F.relu(x))))))


class Encoder(nn.Module):
    """``image_B1HW`` (grey, 0..1) -> ``feats_BDhw`` with h = H // 8, w = W // 8."""

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or EncoderConfig()
        c = self.config.channels
        if len(c) != 3:
            raise ValueError(f"encoder channels must have 3 entries (strides 2, 4, 8), got {c}")
        layers: list[nn.Module] = []
        for c_in, c_out in zip((1,) + tuple(c[:-1]), c):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
        self.stem = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*[ResBlock(c[-1], self.config.bottleneck, d) for d in self.config.dilations])
        # No ReLU on the output: a final ReLU killed features in FINDINGS.md.
        self.head = nn.Conv2d(c[-1], self.config.out_dim, 1)
        for m in self.stem:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @staticmethod
    def normalize(image_B1HW: torch.Tensor) -> torch.Tensor:
        """Per-image zero mean, unit std: invariance to global gain and offset."""
        mean = image_B1HW.mean(dim=(1, 2, 3), keepdim=True)
        std = image_B1HW.std(dim=(1, 2, 3), keepdim=True)
        # A floor (half a grey level) instead of an epsilon keeps gain invariance exact
        # and stops a uniform frame's sensor noise being blown up.
        return (image_B1HW - mean) / std.clamp(min=2e-3)

    def forward(self, image_B1HW: torch.Tensor) -> torch.Tensor:
        B, _, H, W = image_B1HW.shape
        if H % STRIDE or W % STRIDE:
            raise ValueError(f"image size must be a multiple of {STRIDE} px, got {W}x{H}")
        return self.features(self.normalize(image_B1HW))

    def features(self, normalized_B1HW: torch.Tensor) -> torch.Tensor:
        """``forward`` after ``normalize``: a crop of a normalized image gives the whole image's
        features there (away from the crop's border) when its origin lies on the stride grid."""
        return self.head(self.blocks(self.stem(normalized_B1HW)))  # B, D, H/8, W/8


def patch_centres(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel coordinates ``(u, v)`` of the centres of an h x w grid of patches, shape (h*w, 2).

    Row-major like ``feats_BDhw.flatten(2)``; pixel centres are integers, so the
    centre of the 8 pixels 0..7 is 3.5.
    """
    v, u = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([u, v], dim=-1).reshape(-1, 2).float() * STRIDE + (STRIDE - 1) / 2.0
