"""Sharpening the plane sweep's landmark depths with the raw pixels of the mapping images.

The plane sweep (``aceg_model.landmarks``) compares learned descriptors, which are smooth
within a patch, so the depth where neighbouring views agree is located to about 1 % of the
depth. The mapping images of one sequence share their light, so their raw grey pixels can be
compared directly, and those are sharp: around the sweep's depth, a small window of the
landmark's own image is placed on a fronto-parallel plane at each of a few candidate depths,
projected into the same neighbouring views, and compared by normalized cross-correlation (NCC,
invariant to the exposure changes of a handheld camera). The depth of the best mean NCC, with a
parabola through its neighbours, replaces the sweep's where it is a clear interior maximum.
This is the classical refinement step of multi-view stereo, after a coarse search by features.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aceg_model.frames import Intrinsics
from aceg_model.landmarks import parabola_vertex, scaled_pixels
from aceg_model.model import prepare_image


@dataclass
class PhotoDepthConfig:
    enabled: bool = True
    # The grey images compared are at this multiple of the model's working height (2: a
    # 640x480 camera's own resolution at the default 240 px working height).
    scale: int = 2
    radius_px: int = 4  # the window is (2r+1)^2 pixels at that resolution
    # Searched around the sweep's depth, +-span in inverse depth (the sweep's depth is within
    # 5 % for ~88 % of the seeds on generated room 900001).
    span: float = 0.06
    n_depths: int = 25
    # The best mean NCC must exceed this, else the sweep's depth stays (textureless windows).
    min_ncc: float = 0.0
    chunk: int = 256  # candidates per batch (memory: chunk x n_depths x window x neighbours floats)
    # The views compared: the sweep's neighbours (None), or the sweep's with this many from its wide
    # baseline on (``SweepConfig.n_wide``; 0: none of the wide ones first, the views whose windows
    # look most alike). Measured on the walk jitter900011 (jittered poses), two maps each, with the
    # sweep's 8 wide views: 71.2 % of the queries within 1 cm at None, 74.6 % at 0 (74.3 % before
    # the sweep had wide views), the 5cm and 10cm rates of both walks within 0.3 points.
    n_wide: int | None = 0

    def __post_init__(self) -> None:
        if self.n_wide is not None and self.n_wide < 0:
            raise ValueError(f"n_wide must be None or >= 0, got {self.n_wide}")
        if self.scale < 1 or self.radius_px < 1 or self.n_depths < 3 or self.chunk < 1:
            raise ValueError(f"invalid photometric depth settings {self}")
        if not 0 < self.span < 1:
            raise ValueError(f"span must be in (0, 1), got {self.span}")
        if not -1 <= self.min_ncc < 1:
            raise ValueError(f"min_ncc must be in [-1, 1), got {self.min_ncc}")


@dataclass
class GreyViews:
    """The mapping images as grey pixels (uint8) at ``scale`` x the working resolution, with the
    intrinsics of that size."""

    grey_IHW: torch.Tensor
    K_I33: torch.Tensor
    scale: int


def grey_image(image: np.ndarray, intrinsics: Intrinsics, working_height: int, scale: int
               ) -> tuple[torch.Tensor, Intrinsics]:
    """An image as ``H x W`` uint8 grey at ``scale`` x the working height, and its intrinsics."""
    image_1HW, K = prepare_image(image, intrinsics, working_height * scale)
    return image_1HW[0].mul(255.0).round().to(torch.uint8), K


def window_offsets(radius_px: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(2r+1)^2 x 2`` pixel offsets of a window, row-major from the top-left (x fastest)."""
    ax = torch.arange(-radius_px, radius_px + 1, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(ax, ax, indexing="xy"), -1).reshape(-1, 2)


def sample_grey(grey_nHW: torch.Tensor, uv_nP2: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``n x P`` of n grey images at pixels (pixel-centre convention)."""
    H, W = grey_nHW.shape[-2:]
    grid = torch.stack([(uv_nP2[..., 0] + 0.5) / W * 2 - 1, (uv_nP2[..., 1] + 0.5) / H * 2 - 1], -1)
    return F.grid_sample(grey_nHW[:, None].float(), grid[:, :, None], align_corners=False,
                         padding_mode="border")[:, 0, :, 0]


def zero_mean_unit(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


@torch.no_grad()
def refine_depths(views: GreyViews, T_cam_map_I44: torch.Tensor, neigh_In: torch.Tensor,
                  images_C: torch.Tensor, pixels_C2: torch.Tensor, depth_C: torch.Tensor,
                  config: PhotoDepthConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depths of candidates (a working-resolution pixel of a mapping image each) refined by NCC
    around ``depth_C``, and the best mean NCC (``-inf`` where nothing was compared). A depth
    stays as given where it is not finite, where the best NCC is at the edge of the searched
    range or below ``min_ncc``, or where fewer than two neighbours (``neigh_In``, -1 for none)
    see the window."""
    cfg = config or PhotoDepthConfig()
    device = depth_C.device
    grey = views.grey_IHW
    H, W = grey.shape[-2:]
    offsets_W2 = window_offsets(cfg.radius_px, device)
    n_win, D = len(offsets_W2), cfg.n_depths
    rel_D = torch.linspace(-cfg.span, cfg.span, D, device=device)
    pixels_C2 = scaled_pixels(pixels_C2, views.scale)
    T_map_cam_I44 = torch.linalg.inv(T_cam_map_I44)
    Kinv_I33 = torch.linalg.inv(views.K_I33)
    out = depth_C.clone()
    best_ncc = torch.full_like(depth_C, float("-inf"))
    order = images_C.argsort(stable=True)
    images, counts = torch.unique_consecutive(images_C[order], return_counts=True)
    start = 0
    for img, count in zip(images.tolist(), counts.tolist()):
        nb = neigh_In[img]
        nb = nb[nb >= 0]
        group = order[start:start + count]
        start += count
        if len(nb) < 2:
            continue
        # A window pixel p at camera depth d lands in neighbour k at d * A_k p + b_k (homogeneous),
        # A_k = K_k R_k K^-1 and b_k = K_k t_k from this camera to the neighbour's: a 3x3 product
        # per window pixel and neighbour, shared by every depth tried.
        T_nb = T_cam_map_I44[nb] @ T_map_cam_I44[img]
        A_n33 = views.K_I33[nb] @ T_nb[:, :3, :3] @ Kinv_I33[img]
        b_n3 = torch.einsum("nij,nj->ni", views.K_I33[nb], T_nb[:, :3, 3])
        for s in range(0, len(group), cfg.chunk):
            rows = group[s:s + cfg.chunk]
            d0 = depth_C[rows]
            ok = d0.isfinite() & (d0 > 0)
            if not ok.any():
                continue
            rows, d0 = rows[ok], d0[ok]
            c = len(rows)
            win_cW2 = pixels_C2[rows, None] + offsets_W2
            own_cW = zero_mean_unit(sample_grey(grey[img:img + 1], win_cW2.reshape(1, -1, 2)).view(c, n_win))
            # Fronto-parallel windows: every pixel of a window at the same camera depth.
            depths_cD = 1.0 / ((1.0 / d0)[:, None] * (1.0 + rel_D))
            Ap_nc1W3 = (F.pad(win_cW2, (0, 1), value=1.0) @ A_n33.transpose(1, 2)[:, None]).unsqueeze(2)
            uvz = depths_cD[None, :, :, None, None] * Ap_nc1W3 + b_n3[:, None, None, None]  # n x c x D x W x 3
            uv = uvz[..., :2] / uvz[..., 2:].clamp(min=1e-6)
            seen = ((uv[..., 0] >= 0) & (uv[..., 0] <= W - 1) & (uv[..., 1] >= 0) & (uv[..., 1] <= H - 1)
                    & (uvz[..., 2] > 0.05)).all(-1)  # n x c x D
            theirs = zero_mean_unit(sample_grey(grey[nb], uv.reshape(len(nb), -1, 2)).view(len(nb), c, D, n_win))
            ncc = (theirs * own_cW[None, :, None]).sum(-1)
            n_seen = seen.sum(0)
            mean_ncc = torch.where(n_seen >= 2, (ncc * seen).sum(0) / n_seen.clamp(min=1),
                                   torch.full_like(n_seen, -2.0, dtype=ncc.dtype))
            top, arg = mean_ncc.max(1)
            lo, hi = (arg - 1).clamp(min=0), (arg + 1).clamp(max=D - 1)
            shift = parabola_vertex(top, mean_ncc.gather(1, lo[:, None])[:, 0], mean_ncc.gather(1, hi[:, None])[:, 0])
            refined = 1.0 / ((1.0 / d0) * (1.0 + rel_D[arg] + shift * (rel_D[1] - rel_D[0])))
            good = (arg > 0) & (arg < D - 1) & (top > cfg.min_ncc) & (n_seen.gather(1, arg[:, None])[:, 0] >= 2)
            out[rows] = torch.where(good, refined, d0)
            best_ncc[rows] = torch.where(top > -2.0, top, torch.full_like(top, float("-inf")))
    return out, best_ncc


@dataclass
class LandmarkWindows:
    """Each landmark's appearance in the mapping image it was seeded from: the grey window around
    its pixel there (``M x (2r+1)^2`` uint8, row-major from the top-left), and the window's
    geometry as a fronto-parallel patch at the landmark's depth in that view: the map-frame step
    of one window pixel along the image's x and y (``M x 2 x 3``). Window pixel (dx, dy) is the
    3D point ``position + dx * axes[:, 0] + dy * axes[:, 1]``. What the query's photometric
    refinement (``aceg_model.photometric_refinement``) looks for."""

    grey_MW: torch.Tensor
    axes_M23: torch.Tensor
    radius_px: int
    scale: int  # the grey images' multiple of the working resolution


@torch.no_grad()
def landmark_windows(views: GreyViews, T_cam_map_I44: torch.Tensor, images_M: torch.Tensor,
                     positions_M3: torch.Tensor, radius_px: int) -> LandmarkWindows:
    """The windows of landmarks at ``positions_M3`` (map frame) seeded from mapping images
    ``images_M``: centred where each landmark projects into its image."""
    T = T_cam_map_I44[images_M]
    pts_M3 = torch.einsum("mij,mj->mi", T[:, :3, :3], positions_M3.float()) + T[:, :3, 3]
    K = views.K_I33[images_M]
    uvz = torch.einsum("mij,mj->mi", K, pts_M3)
    centre_M2 = uvz[:, :2] / uvz[:, 2:].clamp(min=1e-6)
    offsets = window_offsets(radius_px, positions_M3.device)
    grey = torch.empty(len(positions_M3), len(offsets), dtype=torch.uint8, device=positions_M3.device)
    for i in images_M.unique().tolist():
        rows = (images_M == i).nonzero()[:, 0]
        win = (centre_M2[rows, None] + offsets).reshape(1, -1, 2)
        grey[rows] = sample_grey(views.grey_IHW[i:i + 1], win).view(len(rows), -1).round().clamp(0, 255).to(torch.uint8)
    # One pixel step at the landmark's depth z, along the camera's x and y axes, in the map frame.
    z = pts_M3[:, 2].clamp(min=1e-6)
    R_map_cam = T[:, :3, :3].transpose(1, 2)
    axes = torch.stack([R_map_cam[:, :, 0] * (z / K[:, 0, 0])[:, None], R_map_cam[:, :, 1] * (z / K[:, 1, 1])[:, None]], 1)
    return LandmarkWindows(grey, axes, radius_px, views.scale)
