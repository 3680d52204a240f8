"""Losses: reprojection NLL for mapping, 3D NLL and dense correspondence for pre-training.

Uncertainty convention: the regressor predicts ``log_sigma`` in metres, the
scale of a Laplace distribution of the 3D error. Seen from a camera at depth
z with focal f, it is ``f * sigma / z`` pixels, so the same number serves the
3D loss (pre-training) and the reprojection loss (mapping).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aceg_model.encoder import patch_centres


@dataclass
class ReprojectionLossConfig:
    """ACE-style validity rules plus a robust, annealed Laplace NLL.

    Predictions behind the camera (z < ``min_depth``), implausibly far
    (z > ``max_depth``) or off by more than ``max_reproj_px`` are invalid: for
    them the loss pulls the point towards ``target_depth`` along the pixel's
    ray, which brings random initial predictions in front of the camera.
    """

    min_depth: float = 0.1  # m
    max_depth: float = 100.0  # m
    max_reproj_px: float = 1000.0  # px; larger errors are treated as invalid
    target_depth: float = 2.0  # m; rooms, not streets (ACE uses 10 m); also where mapping seeds landmarks
    robust_start_px: float = 50.0  # px; the robust scale anneals from here...
    robust_end_px: float = 3.0  # ...to here over the mapping schedule
    min_sigma_px: float = 0.5  # floor on the pixel scale so the NLL stays bounded


def robust_scale(progress: float, cfg: ReprojectionLossConfig) -> float:
    """Robust scale in px at ``progress`` in [0, 1]: a quarter circle from start to end.

    It stays near the start for most of the schedule and drops at the end (the
    shape ACE uses): a cosine dropped too early here and froze points whose
    error was still large, since the tanh has no gradient beyond a few scales.
    """
    p = min(max(progress, 0.0), 1.0)
    return cfg.robust_end_px + (cfg.robust_start_px - cfg.robust_end_px) * math.sqrt(1.0 - p * p)


def pixel_rays(K_b33: torch.Tensor, pixels_b2: torch.Tensor) -> torch.Tensor:
    """Camera-frame rays ``K^-1 [u, v, 1]`` of pixels (points at depth 1 m)."""
    return torch.linalg.solve(K_b33, F.pad(pixels_b2, (0, 1), value=1.0).unsqueeze(-1)).squeeze(-1)


def reprojection_nll(
    coords_world_b3: torch.Tensor,
    log_sigma_b: torch.Tensor,
    pixels_b2: torch.Tensor,
    T_cam_world_b44: torch.Tensor,
    K_b33: torch.Tensor,
    progress: float,
    cfg: ReprojectionLossConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over patches and a few statistics (valid fraction, median error in px)."""
    # World -> camera -> pixels, with the known mapping pose.
    R, t = T_cam_world_b44[:, :3, :3], T_cam_world_b44[:, :3, 3]
    p_cam_b3 = torch.einsum("bij,bj->bi", R, coords_world_b3) + t
    z_b = p_cam_b3[:, 2]
    uv_b2 = torch.einsum("bij,bj->bi", K_b33, p_cam_b3)[:, :2] / z_b.clamp(min=cfg.min_depth).unsqueeze(1)
    err_b = (uv_b2 - pixels_b2).norm(dim=1)
    valid_b = (z_b > cfg.min_depth) & (z_b < cfg.max_depth) & (err_b < cfg.max_reproj_px)

    # Valid points: a robust (tanh-saturated) pixel error moves the coordinates, and
    # the Laplace NLL of that error, detached, trains the uncertainty. Coupling them
    # (err / sigma) lets the network inflate sigma until coordinate gradients vanish:
    # measured here, mapping stalled at a 200 px median error that way.
    f_b = K_b33[:, 0, 0]
    sigma_px_b = (f_b * log_sigma_b.exp() / z_b.clamp(min=cfg.min_depth).detach()).clamp(min=cfg.min_sigma_px)
    tau = robust_scale(progress, cfg)
    robust_b = tau * torch.tanh(err_b / tau)
    nll_b = robust_b + robust_b.detach() / sigma_px_b + sigma_px_b.log()

    # Invalid points: pull towards the ray point at target_depth (in camera coordinates).
    target_cam_b3 = pixel_rays(K_b33, pixels_b2) * cfg.target_depth
    pull_b = (p_cam_b3 - target_cam_b3).abs().sum(dim=1)

    loss_b = torch.where(valid_b, nll_b, pull_b)
    stats = {
        "valid": valid_b.float().mean().item(),
        "median_px": err_b[valid_b].median().item() if valid_b.any() else float("nan"),
    }
    return loss_b.mean(), stats


def coords_nll(coords_b3: torch.Tensor, log_sigma_b: torch.Tensor, gt_b3: torch.Tensor) -> torch.Tensor:
    """3D error (metres) plus the Laplace NLL of it for the uncertainty; non-finite ground truth is ignored."""
    ok_b = torch.isfinite(gt_b3).all(dim=1)
    if not ok_b.any():
        return coords_b3.sum() * 0.0
    err_b = (coords_b3[ok_b] - gt_b3[ok_b]).norm(dim=1)
    log_sigma_b = log_sigma_b[ok_b]
    # Error and uncertainty decoupled as in reprojection_nll.
    return (err_b + err_b.detach() / log_sigma_b.exp() + log_sigma_b).mean()


def info_nce(feats_a_nD: torch.Tensor, feats_b_nD: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE: row i of a matches row i of b; the other rows are negatives."""
    a = F.normalize(feats_a_nD, dim=1)
    b = F.normalize(feats_b_nD, dim=1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def local_nce(feats_a_nD: torch.Tensor, feats_b_nkD: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Cross-entropy of each point of a against k candidates in b, candidate 0 the true match and
    the others the features a few pixels beside it: a loss on how sharply a feature says *where*
    it is, which the InfoNCE's negatives (other points, mostly far apart) leave untrained."""
    a = F.normalize(feats_a_nD, dim=1)
    b = F.normalize(feats_b_nkD, dim=2)
    logits = torch.einsum("nd,nkd->nk", a, b) / temperature
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long, device=a.device))


def cell_line_distances(lines_n3: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``n x (h*w)``: pixels from each line (a, b, c of ax + by + c = 0) to the centres of the cells
    of an ``h x w`` stride-8 feature map, row-major (``encoder.patch_centres``, as pretrain.bilinear samples it)."""
    centres = patch_centres(h, w, lines_n3.device)
    return (lines_n3[:, :2] @ centres.T + lines_n3[:, 2:]).abs() / lines_n3[:, :2].norm(dim=1, keepdim=True)


def epipolar_nce(feats_a_nD: torch.Tensor, feats_b_Dhw: torch.Tensor, lines_n3: torch.Tensor,
                 band_px: float, temperature: float = 0.07) -> torch.Tensor | None:
    """Each point of a against every cell of b, the cells whose centre lies within ``band_px``
    of the point's epipolar line in b (``lines``: a, b, c of ax + by + c = 0 in b's working
    pixels) counted as positives: minus the log of the softmax mass on them. Asks a point's
    best matches to lie on its line, which real posed pairs give without depth. None when no
    line crosses b."""
    D, h, w = feats_b_Dhw.shape
    near = cell_line_distances(lines_n3, h, w) <= band_px
    keep = near.any(1) & ~near.all(1)
    if not keep.any():
        return None
    a = F.normalize(feats_a_nD[keep], dim=1)
    b = F.normalize(feats_b_Dhw.flatten(1), dim=0)
    logits = a @ b / temperature
    positive = logits.masked_fill(~near[keep], float("-inf")).logsumexp(1)
    return (logits.logsumexp(1) - positive).mean()
