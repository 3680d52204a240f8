"""Localization's last step: each landmark's observation placed by its raw pixels.

Once a pose is accepted, every landmark that supported it is looked up in the query image by
its appearance in the mapping image it was seeded from (``photo_depth.LandmarkWindows``): its
grey window, a fronto-parallel patch at the landmark's depth, is projected into the query with
the pose, and slid by whole pixels within ``search_px``; the shift with the best normalized
cross-correlation (NCC; invariant to the query's gain and offset), refined by a parabola per
axis, moves the landmark's projection to where it is seen. PnP then runs again on these
observations. The descriptors place a landmark within its patch; the raw pixels, compared with
the geometry the pose predicts, place it to a fraction of a pixel.
"""
from __future__ import annotations

import torch

from aceg_model.landmarks import parabola_vertex
from aceg_model.photo_depth import LandmarkWindows, sample_grey, zero_mean_unit, window_offsets


def _ncc_at_shifts(template_LW: torch.Tensor, grey_HW: torch.Tensor, uv_LW2: torch.Tensor,
                   centres_L2: torch.Tensor, radius: int, step: int) -> torch.Tensor:
    """NCC ``L x n x n`` of each landmark's (zero-mean unit) template with the query sampled at its
    projected window shifted by ``centres_L2 + (i, j) * step`` pixels, i and j in -radius..radius."""
    L = len(uv_LW2)
    shifts_S2 = window_offsets(radius, uv_LW2.device) * step
    where = uv_LW2[:, None] + (centres_L2[:, None] + shifts_S2[None])[:, :, None]
    samples = sample_grey(grey_HW[None], where.reshape(1, -1, 2)).view(L, len(shifts_S2), -1)
    return (zero_mean_unit(samples) * template_LW[:, None]).sum(-1).view(L, 2 * radius + 1, 2 * radius + 1)


def _best_cell(ncc_Lnn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best NCC, its column, its row) of each ``n x n`` grid."""
    n = ncc_Lnn.shape[-1]
    best, arg = ncc_Lnn.flatten(1).max(1)
    return best, arg % n, arg // n


@torch.no_grad()
def refine_observations(windows: LandmarkWindows, ids_L: torch.Tensor, positions_L3: torch.Tensor,
                        grey_HW: torch.Tensor, K_33: torch.Tensor, T_cam_world_44: torch.Tensor,
                        search_px: int, min_ncc: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where landmarks ``ids_L`` (at ``positions_L3``, the frame of ``T_cam_world_44``) are seen in
    the grey query ``grey_HW`` (intrinsics ``K_33``, the windows' resolution): ``L x 2`` pixels,
    and whether each is trusted (in front of the camera, best NCC above ``min_ncc`` and not at
    the edge of the search).

    Coarse to fine: beyond 2 pixels the shifts are first tried every other pixel, then every
    pixel within 2 of the best of those (a third of the comparisons of a full search at 6 px)."""
    device = positions_L3.device
    L = len(ids_L)
    R, t = T_cam_world_44[:3, :3], T_cam_world_44[:3, 3]
    offsets = window_offsets(windows.radius_px, device)
    axes = windows.axes_M23[ids_L].float()
    pts_LW3 = positions_L3[:, None] + offsets[None, :, :1] * axes[:, None, 0] + offsets[None, :, 1:] * axes[:, None, 1]
    cam = pts_LW3 @ R.T + t
    uvz = cam @ K_33.T
    uv_LW2 = uvz[..., :2] / uvz[..., 2:].clamp(min=1e-6)
    in_front = (cam[..., 2] > 0.05).all(1)
    template = zero_mean_unit(windows.grey_MW[ids_L].float())
    start = torch.zeros(L, 2, device=device)
    coarse_ok = torch.ones(L, dtype=torch.bool, device=device)
    if search_px > 2:
        half = (search_px + 1) // 2
        _, ix, iy = _best_cell(_ncc_at_shifts(template, grey_HW, uv_LW2, start, half, 2))
        start = 2.0 * torch.stack([ix, iy], 1).float() - 2 * half
        coarse_ok = (ix > 0) & (ix < 2 * half) & (iy > 0) & (iy < 2 * half)
    fine = _ncc_at_shifts(template, grey_HW, uv_LW2, start, 2, 1)
    best, ix, iy = _best_cell(fine)
    rows = torch.arange(L, device=device)
    at = lambda y, x: fine[rows, y.clamp(0, 4), x.clamp(0, 4)]  # noqa: E731
    dx = start[:, 0] + (ix - 2) + parabola_vertex(best, at(iy, ix - 1), at(iy, ix + 1))
    dy = start[:, 1] + (iy - 2) + parabola_vertex(best, at(iy - 1, ix), at(iy + 1, ix))
    interior = coarse_ok & (ix > 0) & (ix < 4) & (iy > 0) & (iy < 4)
    # The window's centre pixel is the landmark itself.
    centre = uv_LW2[:, len(offsets) // 2]
    return centre + torch.stack([dx, dy], 1), in_front & interior & (best > min_ncc)
