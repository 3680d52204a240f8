"""Mapping poses corrected by their images (aceg_model.pose_refinement): jittered poses come back
towards the truth, true poses stay where they are, mismatches do not pull them, and the pairs
and settings are what the config says."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_room
from scipy.spatial.transform import Rotation

from aceg_model.frames import Intrinsics
from aceg_model.geometry import invert, make_pose, pose_error
from aceg_model.lens import LensConfig, PairMatches, RadialDistortion
from aceg_model.pose_refinement import (PosedFrames, PoseRefinementConfig, refine_poses, refinement_summary,
                                        select_refinement_pairs, solve_poses)

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"
K = Intrinsics(fx=500.0, fy=500.0, cx=320.0, cy=240.0, width=640, height=480)


def walk(n: int, step_m: float = 0.04) -> np.ndarray:
    """Camera-to-world poses along x, bobbing up and down, looking along z and panning slowly (a
    hand-held camera scanning a wall). On a straight line the spacing of the cameras along it would
    be invisible to epipolar geometry: every pair's baseline would point the same way."""
    return np.stack([make_pose(Rotation.from_euler("y", 0.5 * i, degrees=True).as_matrix(),
                               [step_m * i, 0.05 * np.sin(i / 3), 0.0]) for i in range(n)])


def jitter(poses_I44: np.ndarray, mm: float, deg: float, seed: int) -> np.ndarray:
    """Each pose moved by independent Gaussian noise per axis in its camera frame."""
    rng = np.random.default_rng(seed)
    noise = [make_pose(Rotation.from_rotvec(np.radians(rng.normal(0, deg, 3))).as_matrix(), rng.normal(0, mm / 1e3, 3))
             for _ in poses_I44]
    return np.stack([T @ d for T, d in zip(poses_I44, noise)])


def projected_pairs(poses_I44: np.ndarray, pairs: list[tuple[int, int]], noise_px: float, seed: int,
                    outliers: float = 0.0) -> list[PairMatches]:
    """Matches of random points 2-6 m in front of the cameras, seen in both images of each pair."""
    rng = np.random.default_rng(seed)
    centre = poses_I44[:, :3, 3].mean(0)
    points_N3 = centre + np.c_[rng.uniform(-3, 3, 4000), rng.uniform(-1.5, 1.5, 4000), rng.uniform(2, 6, 4000)]

    def project(T_world_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = (invert(T_world_cam) @ np.c_[points_N3, np.ones(len(points_N3))].T).T[:, :3]
        uv = X[:, :2] / X[:, 2:] * K.fx + [K.cx, K.cy]
        return uv + rng.normal(0, noise_px, uv.shape), (X[:, 2] > 0.5) & (uv >= 0).all(1) & (uv < [640, 480]).all(1)

    out = []
    for i, j in pairs:
        (ua, va), (ub, vb) = project(poses_I44[i]), project(poses_I44[j])
        seen = np.flatnonzero(va & vb)[:150]
        xa, xb = ua[seen], ub[seen].copy()
        bad = rng.random(len(seen)) < outliers
        xb[bad] = rng.uniform([0, 0], [640, 480], (bad.sum(), 2))  # mismatches anywhere in the image
        out.append(PairMatches(xa, xb, np.eye(3), K, K, (i, j)))
    return out


def neighbour_errors(poses_I44: np.ndarray, truth_I44: np.ndarray) -> tuple[float, float]:
    """Median error (mm, deg) of the relative pose of consecutive cameras: blind to where the set stands."""
    errs = [pose_error(invert(poses_I44[i]) @ poses_I44[i + 1], invert(truth_I44[i]) @ truth_I44[i + 1])
            for i in range(len(poses_I44) - 1)]
    return 1e3 * float(np.median([e[0] for e in errs])), float(np.median([e[1] for e in errs]))


CONFIG = PoseRefinementConfig(enabled=True)


@pytest.fixture(scope="module")
def room_frames():
    return list(small_room(900003, mapping_frames=60).mapping)


@pytest.mark.parametrize("seed", [0, 1])
def test_jittered_poses_come_back_towards_the_truth(seed: int) -> None:
    truth = walk(30)
    given = jitter(truth, 3.0, 0.1, seed)
    pairs = projected_pairs(truth, select_refinement_pairs(given, CONFIG), noise_px=0.2, seed=seed)
    refined, iterations = solve_poses(pairs, RadialDistortion(), given, CONFIG)
    before_mm, before_deg = neighbour_errors(given, truth)
    after_mm, after_deg = neighbour_errors(refined, truth)
    assert 1 <= iterations <= CONFIG.max_iterations
    assert after_deg < 0.3 * before_deg, (before_deg, after_deg)
    assert after_mm < 0.6 * before_mm, (before_mm, after_mm)


def test_true_poses_stay_where_they_are() -> None:
    truth = walk(30)
    selected = select_refinement_pairs(truth, CONFIG)
    # Exact matches: the true poses are the minimum, and nothing moves.
    refined, _ = solve_poses(projected_pairs(truth, selected, noise_px=0.0, seed=2), RadialDistortion(), truth, CONFIG)
    assert np.abs(refined - truth).max() < 1e-9
    # Matches with 0.1 px of noise move them by what that noise allows: far less than a tracker's error.
    refined, _ = solve_poses(projected_pairs(truth, selected, noise_px=0.1, seed=2), RadialDistortion(), truth, CONFIG)
    mm, deg = neighbour_errors(refined, truth)
    assert mm < 1.0 and deg < 0.01, (mm, deg)


def test_mismatches_do_not_pull_the_poses() -> None:
    truth = walk(30)
    given = jitter(truth, 3.0, 0.1, seed=3)
    pairs = projected_pairs(truth, select_refinement_pairs(given, CONFIG), noise_px=0.2, seed=3, outliers=0.1)
    refined, _ = solve_poses(pairs, RadialDistortion(), given, CONFIG)
    assert neighbour_errors(refined, truth)[1] < 0.3 * neighbour_errors(given, truth)[1]


def test_pairs_reach_each_baseline_once_and_skip_sharp_turns() -> None:
    poses = walk(40)  # 4 cm apart: the default baselines are 1, 2, 4, 8 and 16 images ahead
    pairs = select_refinement_pairs(poses, CONFIG)
    assert {j - i for i, j in pairs if i == 0} == {1, 2, 4, 8, 16}
    assert all(0 < j - i <= CONFIG.max_gap for i, j in pairs)
    # Panning 0.5 deg per image, a 45 deg turn is 90 images away: with a 5 deg limit, 10 images at most.
    narrow = replace(CONFIG, max_angle_deg=5.0)
    assert {j - i for i, j in select_refinement_pairs(poses, narrow) if i == 0} == {1, 2, 4, 8}
    assert select_refinement_pairs(poses[:1], CONFIG) == []


def test_a_small_room_refined_from_its_images(room_frames) -> None:
    """The whole path on rendered images: SIFT matches, the essential-matrix filter and the solver."""
    frames = room_frames
    truth = np.stack([f.T_world_cam for f in frames])
    jittered = PosedFrames(frames, jitter(truth, 3.0, 0.1, seed=4))
    # Fewer features than the default keep the test short. This room is a weak case for the method:
    # 17 cm between images at 320x240 pairs each image with three others only, so its poses keep
    # some freedom (from the true poses they wander by 0.07 deg): the gain is smaller than on
    # denser sequences (0.22 -> 0.04 deg on generated room 900001, models/README.md).
    result = refine_poses(jittered, None, replace(CONFIG, max_features=800))
    assert result.n_pairs >= 100 and result.accepted and result.gain >= CONFIG.min_gain, refinement_summary(result)
    assert result.median_px_before > 0.3 and result.median_px_after < 0.1, refinement_summary(result)
    given_deg = neighbour_errors(jittered.poses_I44, truth)[1]
    assert neighbour_errors(result.poses_I44, truth)[1] < 0.8 * given_deg, refinement_summary(result)
    assert "refined from" in refinement_summary(result)
    assert set(result.to_json()) >= {"n_pairs", "median_px_before", "median_px_after", "median_move_mm"}


def test_accurate_poses_are_kept_as_given(room_frames) -> None:
    """Rendered poses are exact: the correction can only fit the matches' noise, which barely lowers
    their Sampson distance, so the given poses are kept (and said to be)."""
    truth = np.stack([f.T_world_cam for f in room_frames])
    result = refine_poses(room_frames, None, replace(CONFIG, max_features=800))
    assert result.n_pairs >= 100 and not result.accepted and result.gain < CONFIG.min_gain, refinement_summary(result)
    np.testing.assert_array_equal(result.poses_I44, truth)
    assert result.median_move_mm == 0.0 and "kept as given" in refinement_summary(result)
    # With no threshold the solver's poses are taken, moved by the noise it fitted.
    forced = refine_poses(room_frames, None, replace(CONFIG, max_features=800, min_gain=0.0))
    assert forced.accepted and forced.median_move_mm > 0.0


def test_posed_frames_change_poses_only(room_frames) -> None:
    frames = room_frames[:3]
    poses = walk(3)
    posed = PosedFrames(frames, poses)
    assert len(posed) == 3 and np.array_equal(posed.pose(2), poses[2])
    assert np.array_equal(posed[1].T_world_cam, poses[1]) and posed[1].image is frames[1].image
    with pytest.raises(ValueError, match="one pose per frame"):
        PosedFrames(frames, poses[:2])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="baselines_m"):
        PoseRefinementConfig(baselines_m=())
    with pytest.raises(ValueError, match="min_inliers"):
        PoseRefinementConfig(min_inliers=4)
    with pytest.raises(ValueError, match="prior_m"):
        PoseRefinementConfig(prior_m=0.0)
    with pytest.raises(ValueError, match="anchor_images"):
        PoseRefinementConfig(anchor_images=-1)
    with pytest.raises(ValueError, match="min_gain"):
        PoseRefinementConfig(min_gain=1.0)
    assert PoseRefinementConfig(anchor_images=0).anchor_images == 0  # no anchor is a valid choice


def test_the_sampson_gradient_is_that_of_autograd() -> None:
    from aceg_model.pose_refinement import _sampson

    gen = torch.Generator().manual_seed(0)
    E = torch.randn(3, 3, 3, dtype=torch.float64, generator=gen)
    x_i, x_j = (torch.cat([torch.randn(3, 4, 2, dtype=torch.float64, generator=gen), torch.ones(3, 4, 1,
                           dtype=torch.float64)], -1) for _ in range(2))
    r, grad = _sampson(E, x_i, x_j, with_gradient=True)
    for m in range(4):
        expected, = torch.autograd.grad(_sampson(E.requires_grad_(), x_i, x_j)[0][:, m].sum(), E)
        assert torch.allclose(grad[:, m], expected, rtol=1e-9, atol=1e-12)


def test_mapping_builds_on_the_refined_poses_and_records_them(room_frames, tmp_path) -> None:
    """map_scene with the refinement on: the map's views stand where the refined poses put the
    cameras, and the map file's metadata reports the refinement (cheap mapping settings: the
    landmarks are not what is tested here). A second method maps from the same preparation
    (what ``aceg-eval --baseline`` does) without refining again."""
    import json

    from aceg_model.map_consistency import ConsistencyConfig
    from aceg_model.mapping import MappingConfig, SceneMap, map_scene, prepare_cameras
    from aceg_model.model import AcegModel
    from aceg_model.photo_depth import PhotoDepthConfig
    from aceg_model.pose_check import PoseCheckConfig
    from aceg_model.safe_files import read_meta

    truth = np.stack([f.T_world_cam for f in room_frames])
    jittered = PosedFrames(room_frames, jitter(truth, 3.0, 0.1, seed=5))
    model = AcegModel.load(CHECKPOINT)
    config = MappingConfig(iterations=2, batch_patches=256, sweep_seeds=False, photo_depth=PhotoDepthConfig(enabled=False),
                           lens=LensConfig(estimate=False), pose_check=PoseCheckConfig(enabled=False),
                           consistency=ConsistencyConfig(enabled=False),
                           pose_refinement=replace(CONFIG, max_features=800))
    cameras = prepare_cameras(jittered, config)
    scene_map, report = map_scene(model, jittered, config, cameras=cameras)
    refinement = report.pose_refinement
    assert refinement is cameras.refinement and cameras.seconds > 0.0
    assert refinement is not None and refinement.median_px_after < refinement.median_px_before
    assert np.allclose(scene_map.views.centres_I3, refinement.poses_I44[:, :3, 3], atol=1e-4)
    assert not np.allclose(scene_map.views.centres_I3, jittered.poses_I44[:, :3, 3], atol=1e-4)
    path = tmp_path / "refined.map"
    scene_map.save(path)
    meta = read_meta(path, "aceg-map")
    assert meta["report"]["pose_refinement"]["n_pairs"] == refinement.n_pairs
    assert meta["report"]["pose_refinement"]["accepted"] is True
    assert SceneMap.load(path, model).views is not None
    json.dumps(meta)  # nothing in it that JSON cannot hold
    # The ACE-style head on the same preparation: the same corrected poses, nothing matched again.
    _, ace_report = map_scene(model, jittered, replace(config, method="ace"), cameras=cameras)
    assert ace_report.pose_refinement is refinement
    with pytest.raises(ValueError, match="made for 60 frames, not these 59"):
        map_scene(model, PosedFrames(room_frames[:59], truth[:59]), config, cameras=cameras)
