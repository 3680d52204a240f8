"""The map's covariance floor: how its visits disagree (``aceg_model.map_consistency``)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from aceg_model.geometry import make_pose
from aceg_model.map_consistency import ConsistencyConfig, floor_covariance, pose_difference
from aceg_model.mapping import checked_floor


def test_pose_difference_is_the_covariance_perturbation() -> None:
    rng = np.random.default_rng(0)
    T_b = make_pose(Rotation.random(random_state=1).as_matrix(), rng.normal(size=3))
    d_p, d_theta = np.array([0.02, -0.01, 0.03]), np.radians([0.5, -1.0, 0.2])
    T_a = make_pose(Rotation.from_rotvec(d_theta).as_matrix() @ T_b[:3, :3], T_b[:3, 3] + d_p)
    np.testing.assert_allclose(pose_difference(T_a, T_b), np.concatenate([d_p, d_theta]), atol=1e-12)


def test_floor_is_the_second_moment_without_the_gross_failures() -> None:
    rng = np.random.default_rng(2)
    errors = np.concatenate([rng.normal(0, [0.02, 0.01, 0.01, 0.002, 0.002, 0.002], (900, 6)),
                             np.full((100, 6), 5.0)])  # a tenth of gross failures
    floor = floor_covariance(errors, gate=3.0)
    np.testing.assert_allclose(np.sqrt(np.diag(floor)), [0.02, 0.01, 0.01, 0.002, 0.002, 0.002], rtol=0.1)
    assert np.sqrt(floor_covariance(errors, gate=1e6)[0, 0]) > 1.0  # ungated, the failures dominate
    # 8 of 20 probes 5 cm off: the median calls them failures, the absolute gate keeps them.
    split = np.zeros((20, 6))
    split[:, 0] = 0.001
    split[12:, 0] = 0.05
    assert np.sqrt(floor_covariance(split, gate=3.0)[0, 0]) == pytest.approx(0.001)
    assert np.sqrt(floor_covariance(split, gate=3.0, min_gate_m=0.1)[0, 0]) == pytest.approx(
        np.sqrt((12 * 0.001**2 + 8 * 0.05**2) / 20))


def test_config_and_map_file_values_are_checked() -> None:
    for kw in ({"probes": 0}, {"min_probes": 50, "probes": 40}, {"gate": 0.5}, {"min_gate_m": -0.1}, {"min_landmarks": 0}):
        with pytest.raises(ValueError):
            ConsistencyConfig(**kw)
    good = np.diag([1e-4] * 3 + [1e-5] * 3)
    np.testing.assert_array_equal(checked_floor(good.tolist(), "m"), good)
    for bad in ("x", [[1.0]], -good, good + np.triu(np.ones((6, 6)), 1), np.full((6, 6), np.nan)):
        with pytest.raises(ValueError, match="invalid map_floor"):
            checked_floor(bad.tolist() if isinstance(bad, np.ndarray) else bad, "m")
