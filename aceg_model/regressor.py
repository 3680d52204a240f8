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


class Regressor(nn.Module):
    """``feats_SbF`` (S scenes x b patches) + ``codes_SMD`` -> ``coords_Sb3``, ``log_sigma_Sb``."""

    def __init__(self, config: RegressorConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or RegressorConfig()
        if c.dim % c.n_heads:
            raise ValueError(f"dim={c.dim} must be divisible by n_heads={c.n_heads}")
        self.embed = nn.Sequential(nn.LayerNorm(c.feat_dim), nn.Linear(c.feat_dim, c.dim))
        self.blocks = nn.ModuleList([CrossAttentionBlock(c.dim, c.n_heads, c.mlp_ratio) for _ in range(c.n_layers)])
        self.norm_out = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, 4)
        nn.init.zeros_(self.head.bias)

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
        # log sigma around 10 cm at init; clamped so the NLL cannot run away.
        log_sigma_Sb = (out_Sb4[..., 3] + math.log(0.1)).clamp(math.log(1e-3), math.log(10.0))
        return coords_Sb3, log_sigma_Sb
