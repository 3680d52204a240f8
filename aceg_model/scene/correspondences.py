"""Pixel correspondences between two posed views, checked for visibility by depth.

A pixel of view A shows scene point X (its scene coordinate, or its depth
back-projected with A's pose). X projects into view B at uv_b; the match is
kept when uv_b lies inside B and B's depth there agrees with X's depth in B
(otherwise X is occluded in B or out of its view). This is the free dense
supervision FINDINGS.md found trains an encoder on a CPU budget.
"""
from __future__ import annotations

import numpy as np

from aceg_model.frames import Frame
from aceg_model.geometry import invert


def scene_coords(frame: Frame) -> np.ndarray:
    """HxWx3 world points of a frame: ``meta['scene_coords']``, else its depth back-projected."""
    if "scene_coords" in frame.meta:
        return frame.meta["scene_coords"]
    if frame.depth is None:
        raise ValueError(f"frame {frame.name!r} has neither scene coordinates nor depth")
    K, (h, w) = frame.intrinsics, frame.depth.shape
    v, u = np.mgrid[0:h, 0:w]
    z = frame.depth.astype(np.float64)
    cam_HW3 = np.stack([(u - K.cx) / K.fx * z, (v - K.cy) / K.fy * z, z], -1)
    world = cam_HW3 @ frame.T_world_cam[:3, :3].T + frame.T_world_cam[:3, 3]
    world[z <= 0] = np.nan
    return world.astype(np.float32)


def project(points_N3: np.ndarray, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """(uv N x 2 pixels, depth N metres) of world points in ``frame``'s camera."""
    T_cam_world = invert(frame.T_world_cam)
    cam_N3 = points_N3 @ T_cam_world[:3, :3].T + T_cam_world[:3, 3]
    z = cam_N3[:, 2]
    K = frame.intrinsics
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([K.fx * cam_N3[:, 0] / z + K.cx, K.fy * cam_N3[:, 1] / z + K.cy], 1)
    return uv, z


def correspondences(frame_a: Frame, frame_b: Frame, n: int, rng: np.random.Generator,
                    depth_tol: float = 0.02, candidates: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` matching pixels (uv_a N x 2, uv_b N x 2, float pixel coordinates).

    uv_a are pixel centres of A drawn at random among pixels with a surface;
    uv_b their exact (sub-pixel) projections in B, kept when B's depth at the
    nearest pixel agrees within ``depth_tol`` (relative, plus 1 cm).
    ``candidates`` x n pixels are tried, so fewer than n come back when little
    of A is visible in B.
    """
    if frame_b.depth is None:
        raise ValueError(f"frame {frame_b.name!r} has no depth for the visibility check")
    coords_a = scene_coords(frame_a)
    h, w = coords_a.shape[:2]
    valid = np.flatnonzero(np.isfinite(coords_a[..., 0]).ravel())
    if len(valid) == 0 or n <= 0:
        return np.zeros((0, 2)), np.zeros((0, 2))
    pick = rng.choice(valid, size=min(len(valid), candidates * n), replace=False)
    uv_a = np.stack([pick % w, pick // w], 1).astype(np.float64)
    uv_b, z_b = project(coords_a.reshape(-1, 3)[pick].astype(np.float64), frame_b)
    hb, wb = frame_b.depth.shape
    in_front = (z_b > 0) & np.isfinite(uv_b).all(1)
    px = np.full(uv_b.shape, -1, np.int64)
    px[in_front] = np.round(uv_b[in_front]).astype(np.int64)
    ok = in_front & (px[:, 0] >= 0) & (px[:, 0] < wb) & (px[:, 1] >= 0) & (px[:, 1] < hb)
    d_b = np.zeros(len(pick))
    d_b[ok] = frame_b.depth[px[ok, 1], px[ok, 0]]
    ok &= (d_b > 0) & (np.abs(d_b - z_b) < depth_tol * z_b + 0.01)
    keep = np.flatnonzero(ok)[:n]
    return uv_a[keep], uv_b[keep]
