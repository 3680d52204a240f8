"""The final fit with landmark depths left uncertain along their seed rays (aceg_model.seed_rays):
on a synthetic scene whose landmark depths are off by several per cent, it recovers a query seen
from another angle better than plain PnP on the same points; with exact depths it stays put; the
covariance takes its whitening; bad input and settings are refused."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from aceg_model.frames import Intrinsics
from aceg_model.geometry import make_pose, pose_error
from aceg_model.pnp import PnPConfig, pose_covariance, solve_pnp
from aceg_model.seed_rays import refine_along_seed_rays

INTR = Intrinsics(500.0, 500.0, 320.0, 240.0, 640, 480)


def _look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world pose at ``centre`` looking at ``target`` (OpenCV axes, y down)."""
    z = (target - centre) / np.linalg.norm(target - centre)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    return make_pose(np.stack([x, np.cross(z, x), z], axis=1), centre)


def _project(T_world_cam: np.ndarray, X_N3: np.ndarray) -> np.ndarray:
    P = (X_N3 - T_world_cam[:3, 3]) @ T_world_cam[:3, :3]
    return P[:, :2] / P[:, 2:] * [INTR.fx, INTR.fy] + [INTR.cx, INTR.cy]


def _scene(depth_error: float, seed: int = 0):
    """Landmarks on a wall 2 m away with some relief, seeded from 10 mapping views along 30 cm;
    each landmark's depth from its seed view is off by ``depth_error`` (relative, random sign and
    size up to that); the query stands 60 cm to the side, turned about 17 degrees towards the wall."""
    rng = np.random.default_rng(seed)
    target = np.array([0.0, 0.0, 2.0])
    seeds_I3 = np.stack([np.linspace(-0.15, 0.15, 10), np.zeros(10), np.zeros(10)], axis=1)
    truth_N3 = np.stack([rng.uniform(-0.8, 0.8, 300), rng.uniform(-0.6, 0.6, 300),
                         2.0 + rng.uniform(-0.3, 0.3, 300)], axis=1)
    seed_centres_N3 = seeds_I3[rng.integers(0, 10, 300)]
    scale_N1 = 1.0 + depth_error * rng.uniform(-1.0, 1.0, (300, 1))
    mapped_N3 = seed_centres_N3 + scale_N1 * (truth_N3 - seed_centres_N3)
    query = _look_at(np.array([0.6, -0.1, 0.0]), target)
    pixels_N2 = _project(query, truth_N3) + rng.normal(0.0, 0.3, (300, 2))
    return mapped_N3, seed_centres_N3, pixels_N2, query


def test_depth_errors_along_seed_rays_cost_less_than_in_plain_pnp() -> None:
    mapped, seed_centres, pixels, query = _scene(depth_error=0.08)
    plain = solve_pnp(mapped, pixels, INTR, PnPConfig(threshold_px=20.0, reference_height_px=None))
    assert plain.success
    plain_cm = 100 * pose_error(plain.T_world_cam, query)[0]
    T, whiten = refine_along_seed_rays(plain.T_world_cam, mapped, seed_centres, pixels, INTR,
                                       depth_sigma=0.05, sigma_px=1.0, loss_scale_px=10.0)
    ours_cm = 100 * pose_error(T, query)[0]
    assert plain_cm > 1.0, "the scene must hurt plain PnP for the comparison to mean anything"
    assert ours_cm < 0.5 * plain_cm, (ours_cm, plain_cm)
    assert whiten.shape == (300, 2, 2)


def test_exact_depths_keep_the_pose() -> None:
    mapped, seed_centres, pixels, query = _scene(depth_error=0.0)
    start = query @ make_pose(Rotation.from_rotvec([0.0, 0.01, 0.0]).as_matrix(), [0.02, 0.0, 0.0])
    T, _ = refine_along_seed_rays(start, mapped, seed_centres, pixels, INTR, 0.05, 1.0, 10.0)
    t_err, r_err = pose_error(T, query)
    assert t_err < 0.003 and r_err < 0.1


def test_covariance_takes_the_whitening() -> None:
    mapped, seed_centres, pixels, query = _scene(depth_error=0.0)
    plain, sigma = pose_covariance(query, mapped, pixels, INTR)
    same, sigma_same = pose_covariance(query, mapped, pixels, INTR, whiten_N22=np.tile(np.eye(2), (300, 1, 1)))
    np.testing.assert_allclose(same, plain, rtol=1e-9, atol=1e-15)
    _, whiten = refine_along_seed_rays(query, mapped, seed_centres, pixels, INTR, 0.05, 0.3, 10.0)
    # Down-weighting the depth direction leaves less information: the pose is less certain.
    looser, _ = pose_covariance(query, mapped, pixels, INTR, sigma_floor_px=0.3, whiten_N22=whiten)
    tighter, _ = pose_covariance(query, mapped, pixels, INTR, sigma_floor_px=0.3)
    assert np.trace(looser[:3, :3]) > np.trace(tighter[:3, :3])


def test_bad_input_and_settings_are_refused() -> None:
    mapped, seed_centres, pixels, query = _scene(depth_error=0.0)
    with pytest.raises(ValueError, match="same N observations"):
        refine_along_seed_rays(query, mapped, seed_centres[:10], pixels, INTR, 0.05, 1.0, 10.0)
    with pytest.raises(ValueError, match="must be > 0"):
        refine_along_seed_rays(query, mapped, seed_centres, pixels, INTR, 0.0, 1.0, 10.0)
    with pytest.raises(ValueError, match="seed_ray_depth_sigma"):
        PnPConfig(seed_ray_depth_sigma=-0.1)
    with pytest.raises(ValueError, match="seed_ray_sigma_px"):
        PnPConfig(seed_ray_sigma_px=0.0)
