"""The scene-agnostic regressor and the per-scene map codes ("keyed landmarks").

A scene's map code is M rows of ``[key (K) | position (3)]``: each row is a
landmark, a key saying what it looks like to the regressor and a position
(metres, relative to the map centre) saying where it is. Per patch the
regressor (pre-trained once, frozen at mapping time)

1. turns the encoder feature into a token (LayerNorm, projection, residual
   MLP blocks) and a unit query vector;
2. cross-attends to the codes: softmax(tau * cos(query, key)) over the M
   landmarks, whose values are the positions, gives the attended position;
3. from the token and two confidence statistics of that attention (the best
   cosine and the weight that misses the best landmark) predicts a small
   offset and the log of the uncertainty.

Patches never attend to each other, so mapping samples patches across all
images per batch, as ACE does. Each patch attends only to its
``attention_top_k`` best-matching landmarks (found by a no-grad search), with
a sharp temperature: a patch should take its own landmark's position, not a
blend of look-alikes across the room.

Why not the paper's deep stack over M=1024 x D=256 codes: measured here, a
CPU budget (40 min, ~80 generated scenes) left that design at the
predict-the-centre plateau, and codes-only mapping from random codes could not
leave it (0 % localized on redkitchen and on held-out generated rooms).
With landmark codes, mapping is a soft matching plus triangulation, which
the reprojection loss drives from the first iteration; mapping seeds the keys
from the mapping images' own features and the positions by a plane sweep
along their viewing rays (``aceg_model.landmarks``), i.e. from posed images
alone. The shipped regressor is linear: its query is the PCA projection of
the encoder's features (``fit_query_projection``); see models/README.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RegressorConfig:
    feat_dim: int = 128  # encoder output
    dim: int = 128  # token width
    key_dim: int = 64  # landmark key width K
    # Landmarks M per scene; map file: fp16 keys + fp32 positions = 3.4 MB, plus 3.1 MB of fp16 fine keys.
    n_codes: int = 24576
    n_layers: int = 2  # residual token MLP blocks before the cross-attention
    # tau on cosine similarities at init (learned). Sharp: a patch should take its best
    # landmarks' positions, not a blend of look-alikes across the room (tau 30 blurred the
    # coordinates to ~115 px reprojection error at seeding, 300 to 16 px; generated room 900001).
    init_temperature: float = 300.0
    offset_scale: float = 0.1  # metres; the offset head refines the attended position locally
    # Attend to the k best-matching landmarks only (0: all M). At tau 300 the rest carry
    # ~no weight, and mapping iterations get 2.5x faster (the softmax and its backward shrink).
    attention_top_k: int = 16

    @property
    def code_width(self) -> int:
        return self.key_dim + 3


# Patches per block of the landmark search (measured on the 2-core EPYC, 1200 x 24576 x 64 in
# bfloat16, search + top-16: 49-54 ms in one block, 36-42 ms in blocks of 512, 43-47 ms of 128).
SEARCH_ROWS = 512
# Landmarks per group of the two-stage top-k (``top_k_indices``): 41 -> 29 ms for the search of
# 1200 x 24576 on the 2-core EPYC (32: 31 ms, 128: 31 ms).
SEARCH_GROUP = 64


def top_k_indices(scores_SbM: torch.Tensor, k: int, group: int = SEARCH_GROUP) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dimension, as ``topk`` (ties aside).

    Two stages, because one ``topk`` over all M landmarks costs more than the matmul that made
    the scores: split the M columns into G = M / group strided groups (column m in group m % G),
    keep the k groups with the largest maximum, then take the top k of their k * group columns.
    Exact: each of the k best scores is the maximum of its own group or lies in a group whose
    maximum is larger still, so at most k groups hold them all and those k have the largest maxima.
    """
    S, b, M = scores_SbM.shape
    G = M // group
    if M % group or G <= k:
        return scores_SbM.topk(k, dim=-1).indices
    grouped_SbgG = scores_SbM.view(S, b, group, G)  # column m = i * G + g
    groups_Sbk = grouped_SbgG.amax(dim=-2).topk(k, dim=-1).indices
    candidates_Sbgk = grouped_SbgG.gather(3, groups_Sbk.unsqueeze(2).expand(S, b, group, k))
    best_Sbk = candidates_Sbgk.reshape(S, b, group * k).topk(k, dim=-1).indices  # = i * k + j
    return groups_Sbk.gather(2, best_Sbk % k) + G * (best_Sbk // k)


def version_stamp(*tensors: torch.Tensor) -> tuple | None:
    """What changes when any of ``tensors`` is modified in place (optimizer steps, ``copy_``) or
    replaced (a move to another device): the key of the caches derived from parameters. None for
    inference tensors (made under ``torch.inference_mode``), which keep no version counter: a
    cache keyed on them cannot tell a change, so it must not be used."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t._version, t.data_ptr(), t.device) for t in tensors)


@dataclass(frozen=True)
class LandmarkIndex:
    """A scene's landmarks laid out for the top-k search: unit keys (float32, differentiable),
    the same keys in the search dtype, and positions. Built once per map at localization
    (``CodesHead`` caches it); rebuilt every iteration while mapping changes the codes."""

    unit_keys_SMK: torch.Tensor
    search_keys_SMK: torch.Tensor
    positions_SM3: torch.Tensor

    @classmethod
    def build(cls, keys_SMK: torch.Tensor, positions_SM3: torch.Tensor) -> "LandmarkIndex":
        unit_SMK = F.normalize(keys_SMK, dim=-1)
        with torch.no_grad():
            search_SMK = unit_SMK.to(search_dtype(keys_SMK.device.type))
        return cls(unit_SMK, search_SMK, positions_SM3)


@functools.lru_cache(maxsize=None)
def search_dtype(device_type: str) -> torch.dtype:
    """The dtype of the landmark search's matmul: bfloat16 where the hardware has it (CUDA, x86 with
    AVX512-BF16 or AMX: 2.6x faster than float32 at 1200 x 24576 x 64 on the 2-core EPYC), float32
    elsewhere (emulated bf16 or fp16 can be 10x slower on a CPU). Only the top-k choice uses it;
    the attention itself is recomputed in float32 on the chosen keys."""
    if device_type == "cuda":
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if (" avx512_bf16" in flags or " amx_bf16" in flags) else torch.float32


class TokenBlock(nn.Module):
    """Pre-norm residual MLP on one patch token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self._silent: tuple[tuple, bool] | None = None  # (parameter versions, output layer all zero)

    def is_silent(self) -> bool:
        """Whether the output layer is all zero, which makes the block the identity (the linear
        regressor of ``fit_query_projection``); checked again whenever that layer changes."""
        out = self.mlp[-1]
        stamp = version_stamp(out.weight, out.bias)
        if stamp is None or self._silent is None or self._silent[0] != stamp:
            self._silent = (stamp, not bool(out.weight.any() or out.bias.any()))
        return self._silent[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A silent block is skipped unless its output layer is being trained (it must get its
        # gradient to leave zero): 2.8 of the regressor's ~37 ms per frame on the 2-core CPU.
        training_it = torch.is_grad_enabled() and self.mlp[-1].weight.requires_grad
        if not training_it and self.is_silent():
            return x
        return x + self.mlp(self.norm(x))


class Regressor(nn.Module):
    """``feats_SbF`` (S scenes x b patches) + ``codes_SMC`` -> ``coords_Sb3``, ``log_sigma_Sb``."""

    def __init__(self, config: RegressorConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or RegressorConfig()
        if min(c.feat_dim, c.dim, c.key_dim, c.n_codes) <= 0 or c.n_layers < 0:
            raise ValueError(f"regressor sizes must be positive, got {c}")
        self.embed = nn.Sequential(nn.LayerNorm(c.feat_dim), nn.Linear(c.feat_dim, c.dim))
        self.blocks = nn.ModuleList([TokenBlock(c.dim) for _ in range(c.n_layers)])
        self.norm_q = nn.LayerNorm(c.dim)
        self.query = nn.Linear(c.dim, c.key_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(c.init_temperature)))
        self.norm_out = nn.LayerNorm(c.dim)
        self.head = nn.Sequential(nn.Linear(c.dim + 2, c.dim), nn.GELU(), nn.Linear(c.dim, 4))
        nn.init.zeros_(self.head[-1].weight)  # start from the pure attended position and sigma = 10 cm
        nn.init.zeros_(self.head[-1].bias)
        # A spread-out attention (little weight on the best landmark) or a poor best match (low cosine) means the patch
        # found no landmark of its own: its uncertainty grows with both from the start, before
        # any training of the head, so the PnP prefilter can rank correspondences.
        self.confidence_weights = nn.Parameter(torch.tensor([3.0, 3.0]))

    def uses_top_k(self, n_codes: int) -> bool:
        """Whether ``forward`` attends to the top-k landmarks of ``n_codes`` (else to all of them)."""
        return 0 < self.config.attention_top_k < n_codes

    def queries(self, feats_SbF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens ``S x b x D``, unit query vectors ``S x b x K``) of patch features."""
        x = self.embed(feats_SbF)
        for block in self.blocks:
            x = block(x)
        return x, F.normalize(self.query(self.norm_q(x)), dim=-1)

    @torch.no_grad()
    def fit_query_projection(self, feats_NF: torch.Tensor) -> float:
        """Make the regressor linear (identity embedding, silent token blocks) and its query the PCA
        projection of encoder features ``feats_NF`` onto ``key_dim`` dimensions; returns the
        fraction of the variance kept.

        The encoder was trained for dense correspondence by cosine (InfoNCE), so its feature
        geometry is what landmark matching wants; measured on generated scenes the features keep
        99.8 % of their variance in 64 dimensions, and this projection matched 2-3 points more
        patches to the right landmark than the random initial one (generated room 900001).
        """
        c = self.config
        if feats_NF.dim() != 2 or feats_NF.shape[1] != c.feat_dim or len(feats_NF) < c.key_dim:
            raise ValueError(f"need at least {c.key_dim} features of width {c.feat_dim}, got {tuple(feats_NF.shape)}")
        if c.dim == c.feat_dim:
            self.embed[1].weight.copy_(torch.eye(c.dim))
            self.embed[1].bias.zero_()
        for block in self.blocks:  # residual: a zero output layer makes the block the identity
            block.mlp[-1].weight.zero_()
            block.mlp[-1].bias.zero_()
        x = self.norm_q(self.embed(feats_NF.float()))
        mean = x.mean(dim=0)
        _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
        w = v[: c.key_dim]  # key_dim x dim
        self.query.weight.copy_(w)
        self.query.bias.copy_(-(w @ mean))
        return float((s[: c.key_dim] ** 2).sum() / (s ** 2).sum())

    def init_codes(self, n_scenes: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random codes ``S x M x (K+3)``: random unit keys, positions ~ N(0, 1 m)."""
        c = self.config
        return torch.randn(n_scenes, c.n_codes, c.code_width, generator=generator)

    def seed_codes(self, feats_MF: torch.Tensor, positions_M3: torch.Tensor) -> torch.Tensor:
        """Codes ``M x (K+3)`` whose keys are the queries of ``feats_MF`` and positions ``positions_M3``.

        Differentiable (pre-training learns the query through it); wrap in
        ``torch.no_grad`` when seeding a map.
        """
        if feats_MF.shape[0] != positions_M3.shape[0]:
            raise ValueError(f"{feats_MF.shape[0]} features but {positions_M3.shape[0]} positions")
        _, keys_MK = self.queries(feats_MF.unsqueeze(0))
        return torch.cat([keys_MK[0], positions_M3.to(keys_MK.dtype)], dim=-1)

    def attention_logits(self, queries_SbK: torch.Tensor, codes_SMC: torch.Tensor) -> torch.Tensor:
        keys_SMK = F.normalize(codes_SMC[..., : self.config.key_dim], dim=-1)
        return self.log_temperature.exp() * torch.einsum("sbk,smk->sbm", queries_SbK, keys_SMK)

    @staticmethod
    @torch.no_grad()
    def search(q_SbK: torch.Tensor, index: LandmarkIndex, k: int,
               allowed_M: torch.Tensor | None = None) -> torch.Tensor:
        """Indices ``S x b x k`` of the k landmarks whose keys best match unit queries ``q_SbK``;
        with ``allowed_M`` (bool, at least k True) among those landmarks only."""
        keys_SKM = index.search_keys_SMK.transpose(1, 2)  # bmm, not einsum: einsum copied its output (1 ms a block)
        # With allowed_M only the allowed landmarks' keys are scored, not all of them then masked:
        # a mapping image's visit holds 40-60 % of the kitchen's landmarks, and 1200 patches against
        # half of 24576 take 44 ms instead of 117 (float32, 2-core EPYC). Padded to whole groups of
        # the two-stage top-k with columns that never win.
        ids_A = None if allowed_M is None else allowed_M.to(keys_SKM.device).nonzero()[:, 0]
        pad = 0 if ids_A is None else -len(ids_A) % SEARCH_GROUP
        if ids_A is not None:
            keys_SKM = F.pad(keys_SKM[:, :, ids_A], (0, pad))

        # In blocks of SEARCH_ROWS patches: the score block stays in cache between the matmul
        # and the top-k (1200 x 24576 at once is 59 MB). Same result, ~20 % faster on the CPU.
        def block(rows_SbK: torch.Tensor) -> torch.Tensor:
            scores_SbM = torch.bmm(rows_SbK.to(keys_SKM.dtype), keys_SKM)
            if pad:
                scores_SbM[..., -pad:] = float("-inf")
            return top_k_indices(scores_SbM, k)

        found_Sbk = torch.cat([block(q) for q in q_SbK.split(SEARCH_ROWS, dim=1)], dim=1)
        return found_Sbk if ids_A is None else ids_A[found_Sbk]

    def candidates(self, feats_SbF: torch.Tensor, index: LandmarkIndex, best_first: bool = False,
                   allowed_M: torch.Tensor | None = None) -> torch.Tensor:
        """The landmarks each patch would attend to now (``S x b x attention_top_k`` indices); with
        ``best_first`` the best-matching key (the attention's largest weight) in column 0; with
        ``allowed_M`` among those landmarks only (``search``).

        Mapping keeps these per mapping patch and passes them back to ``regress`` for a while:
        the search is ~3/4 of an iteration's time, and the keys move little between refreshes."""
        with torch.no_grad():
            q_SbK = self.queries(feats_SbF)[1]
            idx_Sbk = self.search(q_SbK, index, self.config.attention_top_k, allowed_M)
            if not best_first:
                return idx_Sbk
            s_idx = torch.arange(idx_Sbk.shape[0], device=idx_Sbk.device).view(-1, 1, 1)
            cos_Sbk = (q_SbK.unsqueeze(-2) * index.unit_keys_SMK[s_idx, idx_Sbk].to(q_SbK.dtype)).sum(-1)
            best_Sb1 = cos_Sbk.argmax(dim=-1, keepdim=True)
            first_Sb1 = idx_Sbk.gather(-1, best_Sb1)
            # Swap the best into column 0 (the others keep their places).
            idx_Sbk = idx_Sbk.scatter(-1, best_Sb1, idx_Sbk[..., :1])
            idx_Sbk[..., :1] = first_Sb1
            return idx_Sbk

    def _top_k_logits(self, q_SbK: torch.Tensor, index: LandmarkIndex, k: int,
                      idx_Sbk: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``S x b x k`` and positions ``S x b x k x 3`` of each query's k best landmarks
        (found by ``search`` unless ``idx_Sbk`` gives them).

        The search runs without gradients; the logits are recomputed on the gathered keys, so
        gradients reach exactly the landmarks a patch attends to, and the softmax, its
        backward and the weighted sum touch k instead of M entries per patch."""
        if idx_Sbk is None:
            idx_Sbk = self.search(q_SbK, index, k)
        s_idx = torch.arange(idx_Sbk.shape[0], device=idx_Sbk.device).view(-1, 1, 1)
        keys_SbkK = index.unit_keys_SMK[s_idx, idx_Sbk]
        logits_Sbk = self.log_temperature.exp() * (q_SbK.unsqueeze(-2) * keys_SbkK).sum(dim=-1)
        return logits_Sbk, index.positions_SM3[s_idx, idx_Sbk]

    def forward(self, feats_SbF: torch.Tensor, codes_SMC: torch.Tensor | LandmarkIndex,
                candidates_Sbk: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        coords_Sb3, log_sigma_Sb, _ = self.regress(feats_SbF, codes_SMC, candidates_Sbk=candidates_Sbk)
        return coords_Sb3, log_sigma_Sb

    def regress(self, feats_SbF: torch.Tensor, codes_SMC: torch.Tensor | LandmarkIndex, return_logits: bool = False,
                candidates_Sbk: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``forward`` plus, with ``return_logits``, the dense attention logits ``S x b x M``
        (pre-training supervises them; dense attention is then used whatever ``attention_top_k``).

        ``codes_SMC`` may be a prebuilt ``LandmarkIndex`` of the codes (top-k attention only),
        which saves normalizing and converting all M keys on every call. ``candidates_Sbk``
        (top-k attention only): the landmarks to attend to, from an earlier ``candidates`` call,
        instead of searching for them."""
        c = self.config
        index = codes_SMC if isinstance(codes_SMC, LandmarkIndex) else None
        shape = (*index.positions_SM3.shape[:2], c.code_width) if index else tuple(codes_SMC.shape)
        if feats_SbF.dim() != 3 or len(shape) != 3 or feats_SbF.shape[0] != shape[0] or shape[2] != c.code_width:
            raise ValueError(f"expected feats S x b x {c.feat_dim} and codes S x M x {c.code_width}, "
                             f"got {tuple(feats_SbF.shape)} and {shape}")
        x, q = self.queries(feats_SbF)
        if self.uses_top_k(shape[1]) and not return_logits:
            logits_SbM = None
            index = index or LandmarkIndex.build(codes_SMC[..., :c.key_dim], codes_SMC[..., c.key_dim:])
            logits_Sbk, pos_Sbk3 = self._top_k_logits(q, index, c.attention_top_k, candidates_Sbk)
            att_Sbk = logits_Sbk.softmax(dim=-1)
            attended_Sb3 = (att_Sbk.unsqueeze(-1) * pos_Sbk3).sum(dim=-2)
        elif index is not None or candidates_Sbk is not None:
            raise ValueError("a landmark index or candidates serve top-k attention only; pass the codes for dense attention")
        else:
            logits_SbM = logits_Sbk = self.attention_logits(q, codes_SMC)
            att_Sbk = logits_SbM.softmax(dim=-1)
            attended_Sb3 = att_Sbk @ codes_SMC[..., c.key_dim:].contiguous()  # strided: 1.7x slower measured
        with torch.no_grad():  # confidence statistics: inputs to the uncertainty, not a path for gradients
            best_cos = logits_Sbk.amax(dim=-1) / self.log_temperature.exp()
            # How much of the attention misses the best landmark (the entropy, the first choice,
            # cost a third of the regressor's time at 8192 codes).
            spread = 1.0 - att_Sbk.amax(dim=-1)
        out_Sb4 = self.head(torch.cat([self.norm_out(x), best_cos.unsqueeze(-1), spread.unsqueeze(-1)], dim=-1))
        coords_Sb3 = attended_Sb3 + c.offset_scale * torch.tanh(out_Sb4[..., :3])
        # log sigma from 10 cm for a sharp, exact match up; clamped so the NLL cannot run away.
        w_spread, w_cos = self.confidence_weights
        log_sigma_Sb = (out_Sb4[..., 3] + math.log(0.1) + w_spread * spread + w_cos * (1.0 - best_cos))
        log_sigma_Sb = log_sigma_Sb.clamp(math.log(1e-3), math.log(10.0))
        return coords_Sb3, log_sigma_Sb, logits_SbM
