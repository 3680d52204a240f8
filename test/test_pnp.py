"""Robust PnP, uncertainty prefilter and pose covariance on synthetic correspondences."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from aceg_model.frames import Intrinsics
from aceg_model.geometry import invert, make_pose, pose_error
from aceg_model.pnp import (DegenerateGeometryError, PnPConfig, pose_covariance, prefilter, refine_with_candidates,
                             solve_pnp)

INTRINSICS = Intrinsics.centred(525.0, 640, 480)
# A camera somewhere in the world, looking along a tilted direction.
T_WORLD_CAM = make_pose(Rotation.from_rotvec([0.3, -0.5, 1.0]).as_matrix(), [1.0, 2.0, 3.0])


def synthetic(
    n: int, rng: np.random.Generator, T_world_cam: np.ndarray = T_WORLD_CAM, noise_px: float = 0.0,
    outlier_ratio: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points_world_N3, pixels_N2, is_outlier_N): points 1-6 m in front of the camera, seen in 640x480."""
    pixels_N2 = rng.uniform([0.0, 0.0], [640.0, 480.0], size=(n, 2))
    depth_N = rng.uniform(1.0, 6.0, size=n)
    K_inv = np.linalg.inv(INTRINSICS.K)
    points_cam_N3 = (np.c_[pixels_N2, np.ones(n)] @ K_inv.T) * depth_N[:, None]
    points_world_N3 = points_cam_N3 @ T_world_cam[:3, :3].T + T_world_cam[:3, 3]
    pixels_N2 = pixels_N2 + rng.normal(0.0, noise_px, size=(n, 2))
    is_outlier_N = rng.random(n) < outlier_ratio
    pixels_N2[is_outlier_N] = rng.uniform([0.0, 0.0], [640.0, 480.0], size=(int(is_outlier_N.sum()), 2))
    return points_world_N3, pixels_N2, is_outlier_N


def world_errors(T_est: np.ndarray, T_gt: np.ndarray) -> np.ndarray:
    """6-vector error in the covariance's parameterization: (centre error, world-frame rotation vector)."""
    dtheta = Rotation.from_matrix(T_est[:3, :3] @ T_gt[:3, :3].T).as_rotvec()
    return np.r_[T_est[:3, 3] - T_gt[:3, 3], dtheta]


def test_noise_free_recovers_pose_exactly() -> None:
    points, pixels, _ = synthetic(500, np.random.default_rng(0))
    result = solve_pnp(points, pixels, INTRINSICS)
    assert result.success, result.reason
    dt_m, dr_deg = pose_error(result.T_world_cam, T_WORLD_CAM)
    assert dt_m < 1e-3 and dr_deg < 0.01
    assert result.n_inliers == 500 and result.inlier_mask.all()
    assert set(result.timings_ms) >= {"prefilter", "ransac"}


def test_noise_and_outliers() -> None:
    points, pixels, is_outlier = synthetic(1000, np.random.default_rng(1), noise_px=1.0, outlier_ratio=0.4)
    result = solve_pnp(points, pixels, INTRINSICS)
    assert result.success, result.reason
    dt_m, dr_deg = pose_error(result.T_world_cam, T_WORLD_CAM)
    assert dt_m < 0.01 and dr_deg < 0.1
    # Nearly all true inliers found; outliers only where they landed within the threshold by chance.
    assert result.inlier_mask[~is_outlier].mean() > 0.99
    assert result.inlier_mask[is_outlier].mean() < 0.05
    assert 0.5 < result.sigma_px < 2.0


def test_inlier_threshold_scales_with_the_image_height() -> None:
    # Correspondences 6 px off (inside ACE's 10 px at 480 px height) and 14 px off (outside), then the
    # same scene seen in a 320x240 image: 3 and 7 px off, judged against 5 px once scaled.
    rng = np.random.default_rng(5)
    points, pixels, _ = synthetic(600, rng)
    off = np.repeat([0.0, 6.0, 14.0], 200)
    direction = rng.normal(size=(600, 2))
    pixels = pixels + off[:, None] * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    expected = off < 10.0
    assert PnPConfig().threshold_for(240) == pytest.approx(5.0) and PnPConfig().threshold_for(480) == 10.0
    full = solve_pnp(points, pixels, INTRINSICS)
    small_K = INTRINSICS.resized(320, 240)
    small_pixels = (pixels + 0.5) * 0.5 - 0.5
    small = solve_pnp(points, small_pixels, small_K)
    unscaled = solve_pnp(points, small_pixels, small_K, PnPConfig(reference_height_px=None))
    assert full.success and small.success and unscaled.success
    assert (full.inlier_mask == expected).mean() > 0.98
    assert (small.inlier_mask == expected).mean() > 0.98
    assert unscaled.inlier_mask[off == 14.0].mean() > 0.9, "10 px at 240 px height takes the 7 px ones in"
    with pytest.raises(ValueError, match="reference_height_px"):
        PnPConfig(reference_height_px=0.0)


def test_nonfinite_rows_are_dropped_and_counted() -> None:
    points, pixels, _ = synthetic(300, np.random.default_rng(2), noise_px=0.5)
    points[:10, 0] = np.nan
    pixels[10:15, 1] = np.inf
    result = solve_pnp(points, pixels, INTRINSICS)
    assert result.success, result.reason
    assert result.n_input == 300 and result.n_nonfinite == 15 and result.n_used == 285
    assert not result.inlier_mask[:15].any()


def test_prefilter_is_stable_thresholded_and_top_k() -> None:
    uncertainty = np.array([3.0, 1.0, np.nan, 1.0, 0.5, 9.0, 1.0])
    assert prefilter(uncertainty).tolist() == [0, 1, 3, 4, 5, 6]
    assert prefilter(uncertainty, max_uncertainty=2.0).tolist() == [1, 3, 4, 6]
    # Ties at 1.0: the lower indices win.
    assert prefilter(uncertainty, top_k=3).tolist() == [1, 3, 4]
    assert prefilter(uncertainty, max_uncertainty=0.1).tolist() == []


def test_uncertainty_prefilter_raises_inlier_ratio() -> None:
    rng = np.random.default_rng(3)
    points, pixels, is_outlier = synthetic(3000, rng, noise_px=1.0, outlier_ratio=0.7)
    # Outliers tend to be uncertain; the two distributions overlap.
    uncertainty = np.where(is_outlier, rng.uniform(0.5, 3.0, 3000), rng.uniform(0.0, 1.0, 3000))
    kept = prefilter(uncertainty, top_k=1000)
    assert (~is_outlier[kept]).mean() > (~is_outlier).mean() + 0.3
    config = PnPConfig(top_k=1000)
    result = solve_pnp(points, pixels, INTRINSICS, config, uncertainty_N=uncertainty)
    assert result.success, result.reason
    assert result.n_used == 1000
    assert result.n_inliers / result.n_used > (~is_outlier).mean() + 0.3
    assert pose_error(result.T_world_cam, T_WORLD_CAM)[0] < 0.01


@pytest.mark.parametrize("n", [0, 3, PnPConfig().min_inliers - 1])
def test_refuses_too_few_correspondences(n: int) -> None:
    points, pixels, _ = synthetic(n, np.random.default_rng(4))
    result = solve_pnp(points, pixels, INTRINSICS)
    assert not result.success and result.reason.startswith("too few correspondences")
    assert result.T_world_cam is None and result.covariance_66 is None
    assert result.inlier_mask.shape == (n,)


def test_refuses_all_outliers() -> None:
    points, pixels, _ = synthetic(1000, np.random.default_rng(5), outlier_ratio=1.0)
    result = solve_pnp(points, pixels, INTRINSICS)
    assert not result.success and result.reason.startswith("too few inliers"), result.reason
    assert result.n_inliers < 20


def test_refuses_low_inlier_ratio() -> None:
    points, pixels, _ = synthetic(1000, np.random.default_rng(6), noise_px=1.0, outlier_ratio=0.6)
    result = solve_pnp(points, pixels, INTRINSICS, PnPConfig(min_inlier_ratio=0.5))
    assert not result.success and result.reason.startswith("low inlier ratio"), result.reason


def test_refuses_all_nan() -> None:
    result = solve_pnp(np.full((200, 3), np.nan), np.full((200, 2), np.nan), INTRINSICS)
    assert not result.success and result.reason.startswith("non-finite input")
    assert result.n_nonfinite == 200


def test_collinear_points_are_refused() -> None:
    s_N = np.linspace(0.0, 1.0, 300)
    points_cam = np.c_[-0.5 + s_N, -0.2 + 0.4 * s_N, 2.0 + 2.0 * s_N]
    points = points_cam @ T_WORLD_CAM[:3, :3].T + T_WORLD_CAM[:3, 3]
    pixels = points_cam[:, :2] / points_cam[:, 2:] * 525.0 + [320.0, 240.0]
    with pytest.raises(DegenerateGeometryError, match="unconstrained"):
        pose_covariance(T_WORLD_CAM, points, pixels, INTRINSICS)
    assert not solve_pnp(points, pixels, INTRINSICS).success


def test_shape_errors_raise() -> None:
    with pytest.raises(ValueError, match="points_world_N3"):
        solve_pnp(np.zeros((10, 2)), np.zeros((10, 2)), INTRINSICS)
    with pytest.raises(ValueError, match="pixels_N2"):
        solve_pnp(np.zeros((10, 3)), np.zeros((9, 2)), INTRINSICS)
    with pytest.raises(ValueError, match="uncertainty_N"):
        solve_pnp(np.zeros((10, 3)), np.zeros((10, 2)), INTRINSICS, uncertainty_N=np.zeros(3))
    with pytest.raises(ValueError, match="min_iterations"):
        PnPConfig(min_iterations=10, max_iterations=5)
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="resolve_min_support"):
            PnPConfig(resolve_min_support=share)


def test_covariance_shrinks_with_more_inliers() -> None:
    rng = np.random.default_rng(7)
    config = PnPConfig(min_inliers=50)
    traces = []
    for n in (100, 1000):
        points, pixels, _ = synthetic(n, rng, noise_px=1.0)
        result = solve_pnp(points, pixels, INTRINSICS, config)
        assert result.success, result.reason
        traces.append(np.trace(result.covariance_66))
    # Roughly 1/N: ten times the points, about a tenth of the variance.
    assert traces[1] < 0.25 * traces[0]


def test_noise_free_covariance_is_floored_not_zero() -> None:
    points, pixels, _ = synthetic(500, np.random.default_rng(8))
    result = solve_pnp(points, pixels, INTRINSICS)
    assert result.sigma_px == pytest.approx(0.5)
    assert np.all(np.linalg.eigvalsh(result.covariance_66) > 0)


def test_covariance_matches_monte_carlo_errors() -> None:
    # Fixed geometry, fresh 1 px noise per trial: the empirical covariance of
    # the errors should match the predicted one (within a factor 2; 1000 trials give ratios of 0.94-1.07).
    rng = np.random.default_rng(9)
    points, clean_pixels, _ = synthetic(150, rng)
    config = PnPConfig(min_inliers=50, min_iterations=20)
    errors, predicted = [], []
    for _ in range(200):
        pixels = clean_pixels + rng.normal(0.0, 1.0, clean_pixels.shape)
        result = solve_pnp(points, pixels, INTRINSICS, config)
        assert result.success, result.reason
        errors.append(world_errors(result.T_world_cam, T_WORLD_CAM))
        predicted.append(result.covariance_66)
    empirical_66 = np.cov(np.array(errors).T)
    predicted_66 = np.mean(predicted, axis=0)
    for block in (slice(0, 3), slice(3, 6)):  # position, rotation
        ratio = np.trace(empirical_66[block, block]) / np.trace(predicted_66[block, block])
        assert 0.5 < ratio < 2, ratio
        # Also per world axis: catches a covariance expressed in the wrong frame.
        diag_ratio = np.diag(empirical_66)[block] / np.diag(predicted_66)[block]
        assert np.all((diag_ratio > 0.5) & (diag_ratio < 2)), diag_ratio


rotvecs = st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3)


@settings(max_examples=25, deadline=None)
@given(rotvec=rotvecs, centre=st.lists(st.floats(-50.0, 50.0), min_size=3, max_size=3),
       n=st.integers(6, 200), noise_px=st.floats(0.0, 5.0), seed=st.integers(0, 2**16))
def test_covariance_symmetric_positive_definite(rotvec, centre, n, noise_px, seed) -> None:
    rng = np.random.default_rng(seed)
    T_world_cam = make_pose(Rotation.from_rotvec(rotvec).as_matrix(), centre)
    points, pixels, _ = synthetic(n, rng, T_world_cam, noise_px=noise_px)
    cov_66, sigma_px = pose_covariance(T_world_cam, points, pixels, INTRINSICS)
    assert np.allclose(cov_66, cov_66.T, rtol=0, atol=1e-15)
    assert np.all(np.linalg.eigvalsh(cov_66) > 0)
    assert sigma_px >= 0.5


@settings(max_examples=25, deadline=None)
@given(rotvec=rotvecs, g_rotvec=rotvecs, g_t=st.lists(st.floats(-10.0, 10.0), min_size=3, max_size=3),
       seed=st.integers(0, 2**16))
def test_covariance_follows_a_change_of_world_frame(rotvec, g_rotvec, g_t, seed) -> None:
    # Moving the world by G rotates both blocks of the world-frame covariance by R_G.
    points, pixels, _ = synthetic(60, np.random.default_rng(seed), noise_px=1.0)
    T_world_cam = make_pose(Rotation.from_rotvec(rotvec).as_matrix(), [0.5, -1.0, 2.0])
    T_cam_world0 = invert(T_WORLD_CAM)  # synthetic() used T_WORLD_CAM; re-express in T_world_cam's world
    points = (points @ T_cam_world0[:3, :3].T + T_cam_world0[:3, 3]) @ T_world_cam[:3, :3].T + T_world_cam[:3, 3]
    G = make_pose(Rotation.from_rotvec(g_rotvec).as_matrix(), g_t)
    cov_66, _ = pose_covariance(T_world_cam, points, pixels, INTRINSICS)
    cov_g_66, _ = pose_covariance(G @ T_world_cam, points @ G[:3, :3].T + G[:3, 3], pixels, INTRINSICS)
    A_66 = np.kron(np.eye(2), G[:3, :3])
    assert np.allclose(cov_g_66, A_66 @ cov_66 @ A_66.T, rtol=1e-6, atol=1e-12)


def test_guided_refinement_recovers_correspondences_the_first_match_missed() -> None:
    # Each pixel's true point is one of 8 candidates; the first match took it for 25 % of the
    # pixels and a look-alike elsewhere in the room for the rest. The refinement re-matches
    # with the accepted pose and must find (nearly) all true points and a better pose.
    rng = np.random.default_rng(7)
    n, k = 1000, 8
    points, pixels, _ = synthetic(n, rng, noise_px=2.0)
    candidates = points[:, None] + rng.normal(0.0, 1.5, size=(n, k, 3))  # look-alikes, metres away
    true_slot = rng.integers(k, size=n)
    candidates[np.arange(n), true_slot] = points
    first = candidates[np.arange(n), np.where(rng.random(n) < 0.25, true_slot, (true_slot + 1) % k)]
    config = PnPConfig(top_k=None)
    result = solve_pnp(first, pixels, INTRINSICS, config)
    assert result.success, result.reason
    refined = refine_with_candidates(result, candidates, pixels, INTRINSICS, config)
    assert refined.n_inliers > 3 * result.n_inliers
    assert refined.inlier_mask.mean() > 0.9
    dt_first, _ = pose_error(result.T_world_cam, T_WORLD_CAM)
    dt_refined, dr_refined = pose_error(refined.T_world_cam, T_WORLD_CAM)
    assert dt_refined < dt_first and dt_refined < 5e-3 and dr_refined < 0.05
    assert "guided" in refined.timings_ms
    # The covariance follows the larger inlier set.
    assert np.trace(refined.covariance_66[:3, :3]) < np.trace(result.covariance_66[:3, :3])


def test_guided_refinement_keeps_refusals_and_checks_shapes() -> None:
    points, pixels, _ = synthetic(30, np.random.default_rng(8))
    refused = solve_pnp(points, pixels, INTRINSICS)  # fewer than min_inliers
    assert not refused.success
    assert refine_with_candidates(refused, points[:, None], pixels, INTRINSICS) is refused
    with pytest.raises(ValueError, match="candidates_NK3"):
        refine_with_candidates(refused, points, pixels, INTRINSICS)
