"""The scene-agnostic transformer regressor and the per-scene map codes.

Each patch token cross-attends to the scene's map codes (M x D, learned per
scene) and to nothing else: patches stay independent, so mapping can train on
patches sampled from many images per batch, as ACE does. The output per patch
is a 3D scene coordinate (relative to the map's centre, metres) and the log of
its uncertainty (metres, a Laplace scale in 3D).

The paper uses M=1024 codes of D=256; the defaults here are smaller so that
pre-training fits a 2-core CPU; every size is a config value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RegressorConfig:
    feat_dim: int = 128  # encoder output
    dim: int = 128  # token and code width D
    n_codes: int = 512  # map codes M per scene
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: int = 2
    coord_scale: float = 2.0  # metres; outputs are scaled so a unit activation is a room-sized offset
    readout: str = "landmark"  # "landmark": attention over code positions; "linear": a plain output head


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: tokens attend to codes, then a per-token MLP."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x_SbD: torch.Tensor, codes_SMD: torch.Tensor) -> torch.Tensor:
        S, b, D = x_SbD.shape
        M, h = codes_SMD.shape[1], self.n_heads
        q = self.q(self.norm_q(x_SbD)).view(S, b, h, D // h).transpose(1, 2)  # S h b d
        k, v = self.kv(self.norm_kv(codes_SMD)).view(S, M, 2, h, D // h).permute(2, 0, 3, 1, 4)  # S h M d
        att = F.scaled_dot_product_attention(q, k, v)  # S h b d, fused where available
        x_SbD = x_SbD + self.out(att.transpose(1, 2).reshape(S, b, D))
        return x_SbD + self.mlp(self.norm_mlp(x_SbD))


class LandmarkReadout(nn.Module):
    """The last cross-attention: its values are 3D positions read linearly from the codes.

    Each code then acts as a landmark (a key saying what it looks like and a
    position saying where it is), and a patch's coordinate is the attention-
    weighted mix of landmark positions. Mapping a scene becomes a soft
    clustering plus triangulation of the codes, which the reprojection loss
    can drive even before the regressor has seen many scenes; the tokens still
    reach the codes through the preceding blocks.
    """

    def __init__(self, dim: int, coord_scale: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.pos = nn.Linear(dim, 3, bias=False)  # not normalized: the code's scale carries position freely
        nn.init.normal_(self.pos.weight, std=dim ** -0.5)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(4.0)))  # sharper than 1/sqrt(D) at init
        self.coord_scale = coord_scale

    def forward(self, x_SbD: torch.Tensor, codes_SMD: torch.Tensor) -> torch.Tensor:
        q = self.q(self.norm_q(x_SbD)) * self.log_temperature.exp()  # S b D
        k = self.k(self.norm_k(codes_SMD))  # S M D
        pos_SM3 = self.pos(codes_SMD) * self.coord_scale
        return F.scaled_dot_product_attention(q, k, pos_SM3)  # S b 3


class Regressor(nn.Module):
    """``feats_SbF`` (S scenes x b patches) + ``codes_SMD`` -> ``coords_Sb3``, ``log_sigma_Sb``."""

    def __init__(self, config: RegressorConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or RegressorConfig()
        if c.dim % c.n_heads:
            raise ValueError(f"dim={c.dim} must be divisible by n_heads={c.n_heads}")
        self.embed = nn.Sequential(nn.LayerNorm(c.feat_dim), nn.Linear(c.feat_dim, c.dim))
        self.blocks = nn.ModuleList([CrossAttentionBlock(c.dim, c.n_heads, c.mlp_ratio) for _ in range(c.n_layers)])
        if c.readout not in ("landmark", "linear"):
            raise ValueError(f"readout must be 'landmark' or 'linear', got {c.readout!r}")
        self.readout = LandmarkReadout(c.dim, c.coord_scale) if c.readout == "landmark" else None
        self.norm_out = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, 4)  # coordinate (or offset from the landmark mix) and log sigma
        nn.init.zeros_(self.head.bias)
        if self.readout is not None:
            nn.init.normal_(self.head.weight, std=1e-3)  # start from the pure landmark mix

    def init_codes(self, n_scenes: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random map codes ``S x M x D`` (unit-variance entries; LayerNorm makes the scale moot)."""
        c = self.config
        return torch.randn(n_scenes, c.n_codes, c.dim, generator=generator)

    def forward(self, feats_SbF: torch.Tensor, codes_SMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if feats_SbF.dim() != 3 or codes_SMD.dim() != 3 or feats_SbF.shape[0] != codes_SMD.shape[0]:
            raise ValueError(f"expected feats S x b x F and codes S x M x D, got {tuple(feats_SbF.shape)} and {tuple(codes_SMD.shape)}")
        x = self.embed(feats_SbF)
        for block in self.blocks:
            x = block(x, codes_SMD)
        out_Sb4 = self.head(self.norm_out(x))
        coords_Sb3 = out_Sb4[..., :3] * self.config.coord_scale
        if self.readout is not None:
            coords_Sb3 = coords_Sb3 + self.readout(x, codes_SMD)
        # log sigma around 10 cm at init; clamped so the NLL cannot run away.
        log_sigma_Sb = (out_Sb4[..., 3] + math.log(0.1)).clamp(math.log(1e-3), math.log(10.0))
        return coords_Sb3, log_sigma_Sb
