"""The map's covariance floor: how its visits disagree (``aceg_model.map_consistency``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from aceg_model.geometry import make_pose
from aceg_model.map_consistency import ConsistencyConfig, ConsistencyReport, floor_covariance, pose_difference
from aceg_model.mapping import SceneMap, checked_floor, make_head
from aceg_model.model import AcegModel

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"


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


def test_the_map_file_keeps_the_floor_once_and_reads_maps_that_kept_it_twice(tmp_path: Path) -> None:
    """The report in the map's metadata has the summary numbers; the floor itself is ``map_floor``.
    Maps written before also kept the floor in the report: they load, with the floor of ``map_floor``."""
    floor = np.diag([0.02**2, 0.01**2, 0.01**2, 1e-5, 1e-5, 1e-5])
    report = ConsistencyReport(20, 18, floor, 1.2, 0.3, 4.0)
    summary = report.to_json()
    assert "covariance_66" not in summary and summary["sigma_cm"] == pytest.approx(2.0)
    json.dumps(summary, allow_nan=False)
    assert ConsistencyReport(0, 0, None, float("nan"), float("nan"), 0.0).to_json()["sigma_cm"] is None

    model = AcegModel.load(CHECKPOINT)
    before = {"model_hash": model.model_hash(), "report": {"consistency": {**summary, "covariance_66": floor.tolist()}}}
    SceneMap(make_head(model, "ace"), np.zeros(3), before, floor_66=floor).save(tmp_path / "before.map")
    loaded = SceneMap.load(tmp_path / "before.map", model)
    np.testing.assert_array_equal(loaded.floor_66, floor)
    assert loaded.meta["map_floor"] == floor.tolist()
