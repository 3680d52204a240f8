"""The mapping pose check (aceg_model.pose_check): a generated room's true poses agree with its
images to a fraction of a pixel; a stretch of poses turned by a degree is found and named, and
the rest is not; mapping reports it; bad settings are refused."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import small_room
from scipy.spatial.transform import Rotation

from aceg_model.geometry import make_pose
from aceg_model.pose_check import PoseCheckConfig, check_poses, pose_check_summary, select_moment_pairs


@pytest.fixture(scope="module")
def mapping_frames():
    frames = list(small_room(900003, mapping_frames=60).mapping)
    return [replace(f, name=f"img{i:02d}") for i, f in enumerate(frames)]


def test_true_poses_agree_with_the_images(mapping_frames) -> None:
    check = check_poses(mapping_frames)
    assert len(check.pairs) >= 10
    assert check.median_px < 1.0 and not check.flagged, pose_check_summary(check)
    assert check.to_json()["flagged"] == []


def test_a_stretch_of_turned_poses_is_found_and_named(mapping_frames) -> None:
    # Tilted and rolled (about the camera's x and z axes): an error along the epipolar lines, as a
    # pan would mostly be for a camera moving sideways, cannot show in this check.
    turn = make_pose(Rotation.from_rotvec(np.radians([1.0, 0.0, 1.0])).as_matrix(), np.zeros(3))
    bad = set(range(30, 36))
    frames = [replace(f, T_world_cam=f.T_world_cam @ turn) if i in bad else f for i, f in enumerate(mapping_frames)]
    check = check_poses(frames)
    assert check.flagged, pose_check_summary(check)
    flagged_images = {i for run in check.flagged for p in run for i in (p.first, p.second)}
    # Every flagged pair has a turned image in it (pairs within the stretch agree: both turned).
    assert all(bool({p.first, p.second} & bad) for run in check.flagged for p in run)
    assert flagged_images & bad
    worst = max(p.median_px for run in check.flagged for p in run)
    assert worst > 3.0
    summary = pose_check_summary(check)
    assert "disagree" in summary and "img3" in summary
    # The unperturbed rest of the sequence still agrees.
    clean = [p.median_px for p in check.pairs if not {p.first, p.second} & bad]
    assert np.median(clean) < 1.0


def test_pairs_are_a_moment_apart_with_a_baseline(mapping_frames) -> None:
    poses = np.stack([f.T_world_cam for f in mapping_frames])
    cfg = PoseCheckConfig()
    for i, j in select_moment_pairs(poses, cfg):
        assert 0 < j - i <= cfg.max_gap
        assert np.linalg.norm(poses[j, :3, 3] - poses[i, :3, 3]) >= cfg.min_baseline_m
    assert select_moment_pairs(poses[:1], cfg) == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_inliers"):
        PoseCheckConfig(min_inliers=3)
    with pytest.raises(ValueError, match="warn_px"):
        PoseCheckConfig(warn_px=0.0)
