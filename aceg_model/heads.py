"""Scene heads: what mapping optimizes for one scene, on top of frozen encoder features.

- ``CodesHead`` (ACE-G): the pre-trained regressor, frozen, with the scene's
  map codes (landmark keys and positions) as the only trainable tensors.
- ``MlpHead`` (the ACE-style baseline): a per-scene MLP trained from scratch,
  the same kind of head ACE uses, so both methods share encoder, data,
  loss and budget and differ only in how the scene is represented.

Both map ``feats_bF`` to ``coords_b3`` (metres, relative to the map centre)
and ``log_sigma_b`` (log metres).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from aceg_model.regressor import LandmarkIndex, Regressor, version_stamp


class CodesHead(nn.Module):
    """The frozen regressor plus one scene's codes, held as keys and positions (two learning rates)."""

    method = "aceg"

    def __init__(self, regressor: Regressor, codes_MC: torch.Tensor) -> None:
        super().__init__()
        self.regressor = regressor.requires_grad_(False)
        k = regressor.config.key_dim
        if codes_MC.dim() != 2 or codes_MC.shape[1] != regressor.config.code_width:
            raise ValueError(f"codes must be M x {regressor.config.code_width}, got {tuple(codes_MC.shape)}")
        self.keys = nn.Parameter(codes_MC[:, :k].clone())
        self.positions = nn.Parameter(codes_MC[:, k:].clone())
        self._index: LandmarkIndex | None = None
        self._index_stamp: tuple | None = None

    @property
    def codes(self) -> torch.Tensor:
        return torch.cat([self.keys, self.positions], dim=1)

    def scene_tensors(self) -> dict[str, torch.Tensor]:
        # Keys are compared by cosine: fp16 changes a logit by ~0.1 at tau 300 and halves the file.
        # Positions stay float32: they are metres, and fp16 would round them to ~4 mm at 5 m.
        return {"keys": self.keys.detach().to("cpu", torch.float16).contiguous(),
                "positions": self.positions.detach().to("cpu", torch.float32).contiguous()}

    def load_scene_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.keys.copy_(tensors["keys"].float())
            self.positions.copy_(tensors["positions"].float())

    def landmark_index(self) -> LandmarkIndex:
        """The codes laid out for the regressor's search, built once and reused while the keys and
        positions stay as they are (localization: ~5 ms per 640x480 frame on the 2-core CPU); codes
        made under ``torch.inference_mode`` cannot tell a change, so theirs is rebuilt every call."""
        stamp = version_stamp(self.keys, self.positions)
        if stamp is None or self._index is None or stamp != self._index_stamp:
            with torch.no_grad():
                self._index = LandmarkIndex.build(self.keys.unsqueeze(0), self.positions.unsqueeze(0).contiguous())
            self._index_stamp = stamp
        return self._index

    def candidates(self, feats_bF: torch.Tensor, best_first: bool = False,
                   allowed_M: torch.Tensor | None = None) -> torch.Tensor:
        """``b x attention_top_k`` indices of the landmarks each patch attends to with the codes as
        they are; with ``best_first`` the best-matching key (the attention's largest weight) in
        column 0, which the query's sub-patch refinement looks for; with ``allowed_M`` (bool)
        among those landmarks only (mapping keeps a patch to its visit: ``aceg_model.visits``)."""
        if not self.regressor.uses_top_k(len(self.keys)):
            raise ValueError("candidates need top-k attention (attention_top_k < number of codes)")
        # The cached index follows the codes' versions, so mapping's refreshes see the live codes.
        return self.regressor.candidates(feats_bF.unsqueeze(0), self.landmark_index(), best_first, allowed_M)[0]

    def forward(self, feats_bF: torch.Tensor, candidates_bk: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scene coordinates (relative to the map centre) and log sigma; ``candidates_bk`` from
        ``candidates`` skips the landmark search (mapping refreshes them now and then)."""
        # Mapping (gradients on) builds the index from the live codes at every call; dense attention
        # (as many top-k as codes) takes the codes themselves.
        cached = not torch.is_grad_enabled() and self.regressor.uses_top_k(len(self.keys))
        codes = self.landmark_index() if cached else self.codes.unsqueeze(0)
        cand = None if candidates_bk is None else candidates_bk.unsqueeze(0)
        coords_1b3, log_sigma_1b = self.regressor(feats_bF.unsqueeze(0), codes, cand)
        return coords_1b3[0], log_sigma_1b[0]


class MlpHead(nn.Module):
    """ACE-style head: 3 hidden layers of 512 (FINDINGS.md's baseline), per scene, from scratch."""

    method = "ace"

    def __init__(self, feat_dim: int, hidden: int = 512, n_hidden: int = 3, coord_scale: float = 2.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = feat_dim
        for _ in range(n_hidden):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, 4))
        self.net = nn.Sequential(nn.LayerNorm(feat_dim), *layers)
        self.coord_scale = coord_scale

    def scene_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.state_dict().items()}

    def load_scene_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({k: v.float() for k, v in tensors.items()})

    def forward(self, feats_bF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_b4 = self.net(feats_bF)
        log_sigma_b = (out_b4[:, 3] + math.log(0.1)).clamp(math.log(1e-3), math.log(10.0))
        return out_b4[:, :3] * self.coord_scale, log_sigma_b
