"""The last pose fit, with each landmark free to slide along the ray it was seeded on.

A landmark is a pixel of a posed mapping image (its seed view) pushed out along that pixel's ray to
the depth the plane sweep found (``aceg_model.landmarks``). The ray is as good as the seed view's
pose; the depth is triangulated against neighbouring views that are only centimetres away, so a
disagreement of a pixel or two between the mapping poses moves it by several per cent while the
ray stays put (models/README.md, "Where the kitchen's tail comes from"). A query that looks at
the landmark from another angle sees such a depth error as a shift along one image direction:
the direction in which sliding the landmark along its ray moves its projection.

So the final fit gives each landmark's depth a Gaussian prior of ``depth_sigma`` times its
depth, rather than trusting the depth as much as the ray. Marginalizing the depth adds the
variance ``(depth_sigma * depth * |g|)^2`` along that image direction ``g`` to the observation's
isotropic ``sigma_px^2``; the residual's component along ``g`` is whitened by it. Where the query
looks along the seed ray (``g`` small) nothing changes; where it looks across, the fit leans on
the component that the ray alone decides.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from aceg_model.frames import Intrinsics
from aceg_model.geometry import invert


def _whitened_residuals(rotvec_tcw_6: np.ndarray, points_N3: np.ndarray, rays_N3: np.ndarray,
                        depth_sigma_N: np.ndarray, pixels_N2: np.ndarray, intrinsics: Intrinsics,
                        sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Residuals in pixels of isotropic noise (N x 2) and each observation's 2x2 whitening."""
    R_cw = Rotation.from_rotvec(rotvec_tcw_6[:3]).as_matrix()
    P_N3 = points_N3 @ R_cw.T + rotvec_tcw_6[3:]
    z_N1 = P_N3[:, 2:3]
    f_2, c_2 = np.array([intrinsics.fx, intrinsics.fy]), np.array([intrinsics.cx, intrinsics.cy])
    residual_N2 = f_2 * P_N3[:, :2] / z_N1 + c_2 - pixels_N2
    # Image motion per metre of sliding along the seed ray (the projection's derivative).
    dP_N3 = rays_N3 @ R_cw.T
    g_N2 = f_2 * (dP_N3[:, :2] * z_N1 - P_N3[:, :2] * dP_N3[:, 2:3]) / z_N1**2
    g_norm_N1 = np.linalg.norm(g_N2, axis=1, keepdims=True)
    g_hat_N2 = g_N2 / np.maximum(g_norm_N1, 1e-12)
    # W = I - (1 - sigma_px / s_along) g^ g^T: the along-g component scaled to unit-sigma_px noise.
    shrink_N11 = (1.0 - sigma_px / np.sqrt(sigma_px**2 + (depth_sigma_N[:, None] * g_norm_N1) ** 2))[:, :, None]
    W_N22 = np.eye(2) - shrink_N11 * (g_hat_N2[:, :, None] * g_hat_N2[:, None, :])
    return np.einsum("nij,nj->ni", W_N22, residual_N2), W_N22


def refine_along_seed_rays(T_world_cam: np.ndarray, points_N3: np.ndarray, seed_centres_N3: np.ndarray,
                           pixels_N2: np.ndarray, intrinsics: Intrinsics, depth_sigma: float,
                           sigma_px: float, loss_scale_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The camera pose refitted to inlier observations with each landmark's depth along its seed
    ray uncertain by ``depth_sigma`` (relative), and each observation's 2x2 whitening at that pose
    (for :func:`aceg_model.pnp.pose_covariance`).

    ``points_N3``: the landmarks (map frame, metres); ``seed_centres_N3``: the centres of the
    mapping views they were seeded from; ``pixels_N2``: where the query sees them. Robust (Cauchy,
    scale ``loss_scale_px`` in whitened pixels), starting from ``T_world_cam`` (camera-to-map)."""
    points_N3 = np.asarray(points_N3, dtype=np.float64)
    if not (points_N3.shape == np.shape(seed_centres_N3) and len(points_N3) == len(pixels_N2)):
        raise ValueError(f"points {points_N3.shape}, seed centres {np.shape(seed_centres_N3)} and "
                         f"pixels {np.shape(pixels_N2)} must describe the same N observations")
    if not (depth_sigma > 0 and sigma_px > 0 and loss_scale_px > 0):
        raise ValueError(f"depth_sigma, sigma_px and loss_scale_px must be > 0, got "
                         f"{depth_sigma}, {sigma_px}, {loss_scale_px}")
    offsets_N3 = points_N3 - seed_centres_N3
    depth_N = np.linalg.norm(offsets_N3, axis=1)
    rays_N3 = offsets_N3 / np.maximum(depth_N, 1e-12)[:, None]
    depth_sigma_N = depth_sigma * depth_N
    T_cam_world = invert(T_world_cam)
    x0 = np.concatenate([Rotation.from_matrix(T_cam_world[:3, :3]).as_rotvec(), T_cam_world[:3, 3]])
    args = (points_N3, rays_N3, depth_sigma_N, np.asarray(pixels_N2, dtype=np.float64), intrinsics, sigma_px)
    fit = least_squares(lambda x: _whitened_residuals(x, *args)[0].ravel(), x0, loss="cauchy",
                        f_scale=loss_scale_px, x_scale="jac", max_nfev=50)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = Rotation.from_rotvec(fit.x[:3]).as_matrix(), fit.x[3:]
    return invert(T), _whitened_residuals(fit.x, *args)[1]
