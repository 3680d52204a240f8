"""Robust PnP for scene-coordinate regression: prefilter, RANSAC, refinement, covariance.

The localizer's last stage: 2D-3D correspondences (a pixel and the world
point the regressor predicted for it) -> camera pose + 6x6 covariance, or a
clear refusal when the evidence is too weak.

Conventions (see ``frames.py``): pixels in the OpenCV convention (origin at
the centre of the top-left pixel), OpenCV optical camera frame, world points
in metres, ``T_world_cam`` the camera-to-world 4x4 transform. poselib works
with the world-to-camera pose (``x_cam = R_cw X_world + t_cw``); the
conversion happens in one place, ``_T_world_cam_from_poselib``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import poselib

from aceg_model.frames import Intrinsics
from aceg_model.geometry import invert, make_pose, skew


@dataclass(frozen=True)
class PnPConfig:
    """Prefilter, RANSAC and acceptance settings.

    Pixel values are for images 480 px high (ACE's working resolution); the
    inlier threshold is scaled to the actual image height (``reference_height_px``).
    """

    # ACE's RANSAC inlier threshold (10 px at 480 px height): regressed scene
    # coordinates are noisier than keypoint matches, a tight 2-4 px would
    # drop good correspondences. For correspondences at patch centres (the ACE-style
    # baseline, maps without fine keys, refine_pixels off).
    threshold_px: float = 10.0
    # The threshold the localizer uses instead when it has refined the pixels within their
    # patches (refine_pixels): they are no longer up to half a patch (8 px at 480) off.
    # Four generated rooms, 320 relit queries, the same maps, 5cm/5deg / 10cm/10deg:
    # 10 px 81.6 / 93.1 %, 8 px 84.1 / 93.8 %, 7 px 87.2 / 95.0 %, 6 px 86.9 / 96.6 %; but on
    # real images (KITTI 06, odd frames against a map of the even ones) the median error was
    # 15.6 cm at 10 px, 13.8 at 8, 18.4 at 7, 29.0 at 6, and tighter thresholds leave fewer
    # inliers for min_inliers (Strecha: refusals from 7 px down). 8 px serves both.
    refined_threshold_px: float = 8.0
    # threshold_px is for images this many pixels high: solve_pnp scales it (and the
    # refinement's loss scale) by the image height / this, so it stays the same fraction of
    # the model's patch (the model works at 240 px height whatever the input). None: use
    # threshold_px as given. Measured on 120 relit queries of generated rooms at 320x240
    # (benchmarks/tune_prefilter.py): 10 px unscaled gave 62.5 / 85.0 % at 5cm/5deg /
    # 10cm/10deg, the scaled 5 px 72.5 / 95.0 %, as 10 px at 640x480 gives 70.8 / 93.3 %.
    reference_height_px: float | None = 480.0
    # poselib stops early once success_prob is reached (dynamic trial count);
    # 10k iterations still find a pose at a ~10% inlier ratio with
    # probability 1 - 1e-4 (P3P: (1 - 0.1^3)^1e4 = 4.5e-5), and bound the
    # worst-case time of a refusal to ~0.2 s for 3000 correspondences.
    min_iterations: int = 100
    max_iterations: int = 10_000
    # Refuse with fewer inliers. Measured: localizing 120 query images of one generated room
    # against another room's map (every pose necessarily wrong; rooms 900001 and 900003, the
    # shipped model, 1200 correspondences per 320x240 working image), RANSAC's best wrong pose
    # had 11 inliers at the median and 16 at most (benchmarks/wrong_map_inliers.py). 50 is 3x
    # that. Lower it for small images (fewer correspondences).
    min_inliers: int = 50
    # Off by default: the inlier count is the evidence, and the ratio depends
    # on how many uncertain patches the caller passed. Useful with a fixed top_k.
    min_inlier_ratio: float = 0.0
    # Uncertainty prefilter (applied only when uncertainties are given):
    # drop correspondences above max_uncertainty (the regressor's units;
    # None = no threshold), then keep the top_k most certain (None = all).
    # The model works at 240 px height: 30x40 = 1200 patches per image.
    # Measured on 120 relit queries of generated rooms 900001 and 900003 at
    # 640x480 (benchmarks/tune_prefilter.py): keeping 800 gives the accuracy
    # of keeping all 1200 (70.8 / 93.3 % vs 70.0 / 94.2 % at 5cm/5deg /
    # 10cm/10deg) with RANSAC 2.5x faster (11.9 vs 29.6 ms); 400 or fewer
    # loses points (68.3 / 85.8 %), and so do 5 or 15-20 px thresholds.
    max_uncertainty: float | None = None
    top_k: int | None = 800
    # Floor on the residual standard deviation used for the covariance, so
    # a perfect (noise-free) fit never claims a zero covariance.
    sigma_floor_px: float = 0.5
    # Guided re-matching after the pose is accepted (``refine_with_candidates``): where the
    # regressor offers each patch several candidate landmarks, take per patch the one the pose
    # projects nearest, and refine the pose on all of those within the threshold. Acceptance
    # (min_inliers) is decided before, on the first correspondences only, so a wrong pose
    # cannot gather its evidence this way. Off: on four generated rooms (320 relit queries)
    # it moved 5cm/5deg by -4 to +2 points per room, no shared direction (models/README.md).
    # Measured before the pixel refinement; with it, every candidate is paired with the patch's
    # refined pixel, which was refined for the best candidate only.
    guided_refinement: bool = False
    # Sub-patch refinement of each correspondence's pixel before RANSAC
    # (``aceg_model.pixel_refinement``): where maps carry fine landmark keys, the query is also
    # encoded at the map's fine scale and each patch's pixel moves to where its best landmark's
    # fine key matches best, within refine_window_px working-resolution pixels (the model's
    # 240 px height) of the patch centre. Four generated rooms, 320 relit queries, 5cm/5deg /
    # 10cm/10deg: 69.4 / 86.9 % without, 78.1 / 90.9 % with, same maps (models/README.md).
    refine_pixels: bool = True
    refine_window_px: int = 6
    # The refinement's fine encoding of the query (3x the working height) under bfloat16 on a
    # CPU: 95 -> 55 ms on the 2-core developer CPU, which has native bf16 instructions
    # (benchmarks/README.md, "bench_encoder.py"); a CPU without them emulates bf16 and may be slower.
    refine_bf16: bool = False
    # Once a pose is accepted, place each inlier's landmark by its raw grey window where maps
    # carry them (``aceg_model.photometric_refinement``): the window, projected with the pose, is
    # slid within photometric_search_px pixels of the map's window resolution (2x the working
    # one) for the best NCC, and PnP runs again on these observations, photometric_iterations
    # times (the search after the first at 2 px: the pose is close by then). Observations with
    # a best NCC below photometric_min_ncc are left out; the pose stays as it was if the new
    # one has fewer than min_inliers inliers.
    photometric_refinement: bool = True
    photometric_search_px: int = 6
    photometric_iterations: int = 2
    photometric_min_ncc: float = 0.5
    # Once a pose is accepted, where the map kept its landmarks to visits (``aceg_model.visits``),
    # solve again on the correspondences to landmarks of the visit of the mapping view nearest
    # the pose, so one visit's poses decide it; the pose stays as it was if that finds fewer
    # than min_inliers inliers.
    solve_in_visit: bool = True
    # The re-solves after acceptance (visit, photometric, seed rays) refine the pose; one that moves
    # it off most of the evidence that accepted it has found another pose instead. The localizer
    # keeps the accepting solve's pose when the final one explains (``within_threshold``) less than
    # this share of that solve's inliers. 0 = off. Six tuning scenes, 1345 queries: on rendered
    # poses and KITTI 06 the share stays >= 0.75 and nothing changes; on a block-split room whose
    # ground truth drifts 1 cm, 23-30 queries fall below 0.3-0.7 (the visit re-solve followed
    # one pass's drift 2-3 cm away) and keeping the accepting pose gives 55 % within 2 cm
    # against 50 % (models/README.md, "Re-solve guard").
    resolve_min_support: float = 0.5
    # Add the map's covariance floor (``aceg_model.map_consistency``: how its visits disagree,
    # measured in mapping) to every pose's covariance, where the map has one. The covariance
    # of the inliers' residuals alone does not see the map's own error.
    map_floor: bool = True
    # Optional final fit (``aceg_model.seed_rays``): each inlier landmark's depth along the ray of
    # the mapping view it was seeded from gets a prior of seed_ray_depth_sigma x its depth instead
    # of being trusted like the ray; observations are otherwise uncertain by seed_ray_sigma_px (at
    # reference_height_px, scaled like the threshold). 0 = off (default). At 0.05 (a pixel or two of
    # pose disagreement over the plane sweep's ~8 cm baselines at ~2 m moves a depth by 4-8 %) it
    # gained 3 points at 5cm/5deg on a generated room with drifting poses, lost 2 of 25 KITTI 06
    # frames and lost 2.7 points on the kitchen: not adopted (models/README.md, "Seed rays").
    seed_ray_depth_sigma: float = 0.0
    seed_ray_sigma_px: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.refine_window_px < 1:
            raise ValueError(f"refine_window_px must be >= 1 px, got {self.refine_window_px}")
        if self.photometric_search_px < 1 or self.photometric_iterations < 1:
            raise ValueError(f"photometric_search_px and photometric_iterations must be >= 1, got "
                             f"{self.photometric_search_px}, {self.photometric_iterations}")
        if not -1.0 <= self.photometric_min_ncc < 1.0:
            raise ValueError(f"photometric_min_ncc must be in [-1, 1), got {self.photometric_min_ncc}")
        if not (np.isfinite(self.threshold_px) and self.threshold_px > 0):
            raise ValueError(f"threshold_px must be > 0 px, got {self.threshold_px}")
        if not (np.isfinite(self.refined_threshold_px) and self.refined_threshold_px > 0):
            raise ValueError(f"refined_threshold_px must be > 0 px, got {self.refined_threshold_px}")
        if self.reference_height_px is not None and not (np.isfinite(self.reference_height_px)
                                                         and self.reference_height_px > 0):
            raise ValueError(f"reference_height_px must be > 0 px or None, got {self.reference_height_px}")
        if not 1 <= self.min_iterations <= self.max_iterations:
            raise ValueError(
                f"need 1 <= min_iterations <= max_iterations, got {self.min_iterations}, {self.max_iterations}"
            )
        if self.min_inliers < 4:
            raise ValueError(f"min_inliers must be >= 4 (P3P + 1 check), got {self.min_inliers}")
        if not 0.0 <= self.min_inlier_ratio <= 1.0:
            raise ValueError(f"min_inlier_ratio must be in [0, 1], got {self.min_inlier_ratio}")
        if self.max_uncertainty is not None and not self.max_uncertainty > 0:
            raise ValueError(f"max_uncertainty must be > 0 or None, got {self.max_uncertainty}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not (np.isfinite(self.seed_ray_depth_sigma) and self.seed_ray_depth_sigma >= 0):
            raise ValueError(f"seed_ray_depth_sigma must be >= 0 (0 = off), got {self.seed_ray_depth_sigma}")
        if not (np.isfinite(self.seed_ray_sigma_px) and self.seed_ray_sigma_px > 0):
            raise ValueError(f"seed_ray_sigma_px must be > 0 px, got {self.seed_ray_sigma_px}")
        if not 0.0 <= self.resolve_min_support <= 1.0:
            raise ValueError(f"resolve_min_support must be in [0, 1] (0 = off), got {self.resolve_min_support}")
        if not (np.isfinite(self.sigma_floor_px) and self.sigma_floor_px > 0):
            raise ValueError(f"sigma_floor_px must be > 0 px, got {self.sigma_floor_px}")

    def threshold_for(self, image_height: int) -> float:
        """The RANSAC inlier threshold in pixels of an image ``image_height`` pixels high."""
        if self.reference_height_px is None:
            return self.threshold_px
        return self.threshold_px * image_height / self.reference_height_px


@dataclass
class PnPResult:
    """Outcome of :func:`solve_pnp`.

    ``reason`` is ``"ok"`` on success; refusals start with a stable phrase
    ("non-finite input", "too few correspondences", "too few inliers",
    "low inlier ratio", "degenerate geometry") followed by the numbers.
    ``T_world_cam`` and ``covariance_66`` are None when refused.
    ``inlier_mask`` has one entry per input row (rows dropped as non-finite
    or by the prefilter are False). ``covariance_66``: see :func:`pose_covariance`.
    """

    success: bool
    reason: str
    T_world_cam: np.ndarray | None
    covariance_66: np.ndarray | None
    n_input: int
    n_nonfinite: int
    n_used: int  # reached RANSAC (finite and kept by the prefilter)
    n_inliers: int
    inlier_mask: np.ndarray
    sigma_px: float = float("nan")  # residual std used for the covariance
    ransac_iterations: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)


class DegenerateGeometryError(ValueError):
    """The inliers do not constrain all six pose parameters."""


def prefilter(
    uncertainty_N: np.ndarray, max_uncertainty: float | None = None, top_k: int | None = None
) -> np.ndarray:
    """Indices (ascending) of the correspondences to keep, by uncertainty (lower = more certain).

    Non-finite uncertainties are always dropped; then those above
    ``max_uncertainty``; then all but the ``top_k`` most certain. Ties are
    broken by index (stable sort), so the result is deterministic.
    """
    uncertainty_N = np.asarray(uncertainty_N, dtype=np.float64)
    if uncertainty_N.ndim != 1:
        raise ValueError(f"uncertainty_N must be 1-D, got shape {uncertainty_N.shape}")
    keep = np.isfinite(uncertainty_N)
    if max_uncertainty is not None:
        keep &= uncertainty_N <= max_uncertainty
    idx = np.flatnonzero(keep)
    if top_k is not None and len(idx) > top_k:
        order = np.argsort(uncertainty_N[idx], kind="stable")
        idx = np.sort(idx[order[:top_k]])
    return idx


def _project(
    T_world_cam: np.ndarray, points_world_N3: np.ndarray, intrinsics: Intrinsics
) -> tuple[np.ndarray, np.ndarray]:
    """(pixels_N2, points_cam_N3) of world points seen from ``T_world_cam``."""
    T_cam_world = invert(T_world_cam)
    points_cam_N3 = points_world_N3 @ T_cam_world[:3, :3].T + T_cam_world[:3, 3]
    z_N = points_cam_N3[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        pixels_N2 = np.stack(
            [intrinsics.fx * points_cam_N3[:, 0] / z_N + intrinsics.cx,
             intrinsics.fy * points_cam_N3[:, 1] / z_N + intrinsics.cy], axis=1
        )
    return pixels_N2, points_cam_N3


def within_threshold(T_world_cam: np.ndarray, points_world_N3: np.ndarray, pixels_N2: np.ndarray,
                     intrinsics: Intrinsics, threshold_px: float) -> np.ndarray:
    """``N`` bool: the correspondences a pose explains, in front of the camera and reprojected
    within ``threshold_px`` of their pixels (the inlier test of :func:`solve_pnp`)."""
    proj_N2, points_cam_N3 = _project(T_world_cam, points_world_N3, intrinsics)
    with np.errstate(invalid="ignore"):
        err_N = np.linalg.norm(proj_N2 - pixels_N2, axis=1)
        return (points_cam_N3[:, 2] > 0) & (err_N < threshold_px)


def pose_covariance(
    T_world_cam: np.ndarray,
    points_world_N3: np.ndarray,
    pixels_N2: np.ndarray,
    intrinsics: Intrinsics,
    sigma_floor_px: float = 0.5,
    whiten_N22: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """First-order 6x6 covariance of a camera pose fitted to inlier correspondences.

    Parameterization (ROS ``geometry_msgs/PoseWithCovariance``, REP 103):
    row-major order ``(x, y, z, rot X, rot Y, rot Z)`` of the camera pose in
    the world frame; the true pose is ``p + dp`` and ``exp([dtheta]x) R_world_cam``,
    i.e. ``dp`` (m) is an error of the camera centre along the world axes and
    ``dtheta`` (rad) a small rotation vector about the *fixed world* axes
    (left perturbation, ROS's "fixed-axis representation"). Units m², m·rad, rad².

    Method: J (2N x 6), the pixel residuals' Jacobian w.r.t. the same
    perturbation expressed along the camera axes (``dp_c = R_cw dp``,
    ``dtheta_c = R_cw dtheta``, where the Jacobian is simplest), gives
    ``cov_cam = sigma² (JᵀJ)⁻¹``; sigma² = sum(r²) / (2N - 6), floored at
    ``sigma_floor_px²``. Then ``cov = A cov_cam Aᵀ`` with ``A = diag(R_wc, R_wc)``.
    ``whiten_N22``: optional per-observation 2x2 matrices applied to the
    residuals and their Jacobian first, for fits whose observations are not
    isotropic (``aceg_model.seed_rays``). Returns (cov_66, sigma_px); raises
    :class:`DegenerateGeometryError` when the inliers leave a direction
    unconstrained (e.g. collinear points).
    """
    if len(points_world_N3) < 3:
        raise DegenerateGeometryError(f"degenerate geometry: {len(points_world_N3)} points cannot fix 6 DoF")
    proj_N2, points_cam_N3 = _project(T_world_cam, points_world_N3, intrinsics)
    x_N, y_N, z_N = points_cam_N3.T
    if np.any(z_N <= 0):
        raise DegenerateGeometryError("degenerate geometry: inlier points behind the camera")
    # d(pixel)/d(point in camera): 2x3 per point
    dpi_N23 = np.zeros((len(z_N), 2, 3))
    dpi_N23[:, 0, 0] = intrinsics.fx / z_N
    dpi_N23[:, 0, 2] = -intrinsics.fx * x_N / z_N**2
    dpi_N23[:, 1, 1] = intrinsics.fy / z_N
    dpi_N23[:, 1, 2] = -intrinsics.fy * y_N / z_N**2
    # d(point in camera)/d(dp_c, dtheta_c) = [-I, [X_cam]x]
    dX_N36 = np.concatenate([np.broadcast_to(-np.eye(3), (len(z_N), 3, 3)), skew(points_cam_N3)], axis=2)
    J_N26 = dpi_N23 @ dX_N36
    residuals_N2 = proj_N2 - pixels_N2
    if whiten_N22 is not None:
        J_N26, residuals_N2 = whiten_N22 @ J_N26, np.einsum("nij,nj->ni", whiten_N22, residuals_N2)
    J_2N6 = J_N26.reshape(-1, 6)
    H_66 = J_2N6.T @ J_2N6

    # Degeneracy test on the unit-free (correlation-scaled) normal matrix.
    d_6 = np.sqrt(np.diag(H_66))
    if not np.all(d_6 > 0):
        raise DegenerateGeometryError("degenerate geometry: a pose parameter does not move any pixel")
    eig_6 = np.linalg.eigvalsh(H_66 / np.outer(d_6, d_6))
    if eig_6[0] < 1e-9 * eig_6[-1]:
        raise DegenerateGeometryError(
            f"degenerate geometry: a pose direction is unconstrained (eigenvalue ratio {eig_6[0] / eig_6[-1]:.1e})"
        )

    residuals_2N = residuals_N2.reshape(-1)
    sigma2 = max(float(residuals_2N @ residuals_2N) / max(len(residuals_2N) - 6, 1), sigma_floor_px**2)
    cov_cam_66 = sigma2 * np.linalg.inv(H_66)
    A_66 = np.kron(np.eye(2), T_world_cam[:3, :3])
    cov_66 = A_66 @ cov_cam_66 @ A_66.T
    return 0.5 * (cov_66 + cov_66.T), float(np.sqrt(sigma2))


def _poselib_camera(intrinsics: Intrinsics) -> poselib.Camera:
    return poselib.Camera("PINHOLE", [intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy],
                          intrinsics.width, intrinsics.height)


def _T_world_cam_from_poselib(pose: poselib.CameraPose) -> np.ndarray:
    # poselib's pose is world-to-camera: x_cam = R X_world + t.
    return invert(make_pose(np.asarray(pose.R), np.asarray(pose.t)))


def _refuse(reason: str, n_input: int, **kw) -> PnPResult:
    defaults = dict(n_nonfinite=0, n_used=0, n_inliers=0, inlier_mask=np.zeros(n_input, dtype=bool))
    defaults.update(kw)
    return PnPResult(False, reason, None, None, n_input, **defaults)


def solve_pnp(
    points_world_N3: np.ndarray,
    pixels_N2: np.ndarray,
    intrinsics: Intrinsics,
    config: PnPConfig | None = None,
    uncertainty_N: np.ndarray | None = None,
) -> PnPResult:
    """Camera pose (``T_world_cam``) and covariance from 2D-3D correspondences.

    ``points_world_N3``: world points in metres; ``pixels_N2``: where they
    are seen, in pixels (OpenCV convention); ``uncertainty_N``: optional
    per-correspondence uncertainty for the prefilter (lower = more certain).
    Rows with NaN/inf anywhere are dropped and counted. Pipeline: prefilter,
    poselib LO-RANSAC (P3P) + non-linear refinement on the inliers (Cauchy
    loss, scale threshold/2 px), inliers recounted with the refined pose,
    acceptance tests, covariance (:func:`pose_covariance`). Shape errors raise
    ``ValueError``; weak evidence returns ``success=False`` with a reason.
    """
    config = config or PnPConfig()
    points_world_N3 = np.asarray(points_world_N3, dtype=np.float64)
    pixels_N2 = np.asarray(pixels_N2, dtype=np.float64)
    if points_world_N3.ndim != 2 or points_world_N3.shape[1] != 3:
        raise ValueError(f"points_world_N3 must have shape (N, 3), got {points_world_N3.shape}")
    n_input = len(points_world_N3)
    if pixels_N2.shape != (n_input, 2):
        raise ValueError(f"pixels_N2 must have shape ({n_input}, 2), got {pixels_N2.shape}")
    finite_N = np.isfinite(points_world_N3).all(axis=1) & np.isfinite(pixels_N2).all(axis=1)
    if uncertainty_N is not None:
        uncertainty_N = np.asarray(uncertainty_N, dtype=np.float64)
        if uncertainty_N.shape != (n_input,):
            raise ValueError(f"uncertainty_N must have shape ({n_input},), got {uncertainty_N.shape}")
        finite_N &= np.isfinite(uncertainty_N)
    n_nonfinite = int(n_input - finite_N.sum())
    if n_input > 0 and n_nonfinite == n_input:
        return _refuse(f"non-finite input: all {n_input} correspondences have NaN/inf", n_input,
                       n_nonfinite=n_nonfinite)

    # Prefilter by uncertainty (only among finite rows).
    t0 = time.perf_counter()
    used_idx = np.flatnonzero(finite_N)
    if uncertainty_N is not None:
        used_idx = used_idx[prefilter(uncertainty_N[used_idx], config.max_uncertainty, config.top_k)]
    timings_ms = {"prefilter": (time.perf_counter() - t0) * 1e3}
    n_used = len(used_idx)
    counts = dict(n_nonfinite=n_nonfinite, n_used=n_used, timings_ms=timings_ms)
    if n_used < config.min_inliers:
        return _refuse(
            f"too few correspondences: {n_used} usable of {n_input} ({n_nonfinite} non-finite), "
            f"need >= min_inliers={config.min_inliers}", n_input, **counts)

    # RANSAC + refinement; thresholds and loss scale are in pixels for poselib's Camera API.
    threshold_px = config.threshold_for(intrinsics.height)
    t0 = time.perf_counter()
    camera = _poselib_camera(intrinsics)
    ransac_opt = {"max_reproj_error": threshold_px, "min_iterations": config.min_iterations,
                  "max_iterations": config.max_iterations, "seed": config.seed}
    bundle_opt = {"loss_type": "CAUCHY", "loss_scale": 0.5 * threshold_px}
    pose, info = poselib.estimate_absolute_pose(
        pixels_N2[used_idx], points_world_N3[used_idx], camera, ransac_opt, bundle_opt)
    timings_ms["ransac"] = (time.perf_counter() - t0) * 1e3
    counts["ransac_iterations"] = int(info["iterations"])

    # Recount inliers with the refined pose (in front of the camera, within threshold).
    T_world_cam = _T_world_cam_from_poselib(pose)
    inlier_U = within_threshold(T_world_cam, points_world_N3[used_idx], pixels_N2[used_idx], intrinsics,
                                threshold_px)
    inlier_mask = np.zeros(n_input, dtype=bool)
    inlier_mask[used_idx[inlier_U]] = True
    n_inliers = int(inlier_U.sum())
    counts.update(n_inliers=n_inliers, inlier_mask=inlier_mask)
    if n_inliers < config.min_inliers:
        return _refuse(f"too few inliers: {n_inliers} < min_inliers={config.min_inliers} "
                       f"(of {n_used} used, {threshold_px:g} px threshold)", n_input, **counts)
    if n_inliers < config.min_inlier_ratio * n_used:
        return _refuse(f"low inlier ratio: {n_inliers / n_used:.3f} < min_inlier_ratio="
                       f"{config.min_inlier_ratio:g} ({n_inliers} of {n_used})", n_input, **counts)

    t0 = time.perf_counter()
    try:
        cov_66, sigma_px = pose_covariance(T_world_cam, points_world_N3[inlier_mask], pixels_N2[inlier_mask],
                                           intrinsics, config.sigma_floor_px)
    except DegenerateGeometryError as exc:
        return _refuse(f"{exc} ({n_inliers} inliers)", n_input, **counts)
    timings_ms["covariance"] = (time.perf_counter() - t0) * 1e3
    return PnPResult(True, "ok", T_world_cam, cov_66, n_input, sigma_px=sigma_px, **counts)


def refine_with_candidates(
    result: PnPResult,
    candidates_NK3: np.ndarray,
    pixels_N2: np.ndarray,
    intrinsics: Intrinsics,
    config: PnPConfig | None = None,
) -> PnPResult:
    """Refine an accepted pose on re-matched correspondences (guided matching).

    ``candidates_NK3``: per pixel, K candidate world points (the regressor's top-k landmarks;
    NaN rows are ignored). Each pixel takes the candidate that ``result``'s pose projects
    nearest; those within the RANSAC threshold (in front of the camera) refine the pose
    (poselib, Cauchy loss at half the threshold), inliers are recounted with the refined pose
    and the covariance is recomputed from them. On generated rooms the best candidate within
    the threshold is right for ~1.7x as many patches as the single regressed coordinate
    (models/README.md). A refused ``result``, too few re-matched points or a degenerate
    refinement returns ``result`` unchanged."""
    config = config or PnPConfig()
    candidates_NK3 = np.asarray(candidates_NK3, dtype=np.float64)
    pixels_N2 = np.asarray(pixels_N2, dtype=np.float64)
    if candidates_NK3.ndim != 3 or candidates_NK3.shape[2] != 3 or len(candidates_NK3) != len(pixels_N2):
        raise ValueError(f"candidates_NK3 must have shape ({len(pixels_N2)}, K, 3), got {candidates_NK3.shape}")
    if not result.success:
        return result
    t0 = time.perf_counter()
    threshold_px = config.threshold_for(intrinsics.height)
    points_N3, err_N = _nearest_candidates(result.T_world_cam, candidates_NK3, pixels_N2, intrinsics)
    matched_N = err_N < threshold_px
    if matched_N.sum() < config.min_inliers:
        return result
    camera = _poselib_camera(intrinsics)
    T_cam_world = invert(result.T_world_cam)
    initial = poselib.CameraPose()
    initial.R, initial.t = T_cam_world[:3, :3], T_cam_world[:3, 3]
    pose, _ = poselib.refine_absolute_pose(pixels_N2[matched_N], points_N3[matched_N], initial, camera,
                                           {"loss_type": "CAUCHY", "loss_scale": 0.5 * threshold_px})
    T_world_cam = _T_world_cam_from_poselib(pose)
    points_N3, err_N = _nearest_candidates(T_world_cam, candidates_NK3, pixels_N2, intrinsics)
    inlier_N = err_N < threshold_px
    try:
        cov_66, sigma_px = pose_covariance(T_world_cam, points_N3[inlier_N], pixels_N2[inlier_N],
                                           intrinsics, config.sigma_floor_px)
    except DegenerateGeometryError:
        return result
    timings_ms = {**result.timings_ms, "guided": (time.perf_counter() - t0) * 1e3}
    return replace(result, T_world_cam=T_world_cam, covariance_66=cov_66, sigma_px=sigma_px,
                   n_inliers=int(inlier_N.sum()), inlier_mask=inlier_N, timings_ms=timings_ms)


def _nearest_candidates(T_world_cam: np.ndarray, candidates_NK3: np.ndarray, pixels_N2: np.ndarray,
                        intrinsics: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the candidate projecting nearest to it and that distance (inf behind the camera / NaN)."""
    N, K, _ = candidates_NK3.shape
    proj_M2, cam_M3 = _project(T_world_cam, candidates_NK3.reshape(-1, 3), intrinsics)
    with np.errstate(invalid="ignore"):
        err_NK = np.linalg.norm(proj_M2.reshape(N, K, 2) - pixels_N2[:, None], axis=2)
        err_NK[~(cam_M3[:, 2].reshape(N, K) > 0) | ~np.isfinite(err_NK)] = np.inf
    best_N = err_NK.argmin(axis=1)
    rows = np.arange(N)
    return candidates_NK3[rows, best_N], err_NK[rows, best_N]
