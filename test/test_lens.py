"""Radial lens distortion (aceg_model.lens): estimated from posed mapping images of a generated
room seen through a simulated lens, kept at zero for a pinhole camera, removed from images, and
carried in the map file for the queries."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import quick_mapping_config, small_room

from aceg_model.frames import Intrinsics
from aceg_model.geometry import make_pose
from aceg_model.lens import (ImageUndistorter, LensConfig, RadialDistortion, estimate_lens, lens_summary,
                             ratio_matches, select_pairs)
from aceg_model.mapping import MappingLens

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"
SEED = 900023  # held out: pre-training banks use seeds below 100000
LENS = RadialDistortion(-0.10, 0.02)  # barrel, as a webcam or a Kinect colour camera used as pinhole


def distort(image: np.ndarray, intrinsics: Intrinsics, lens: RadialDistortion) -> np.ndarray:
    """What a camera with ``lens`` sees of the scene a pinhole camera rendered: distorted pixel
    u_d shows the pinhole image at the undistorted point of u_d (the inverse of undistortion),
    found with OpenCV's own point undistortion."""
    h, w = image.shape[:2]
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    pts = np.stack([u.ravel(), v.ravel()], axis=1).reshape(-1, 1, 2)
    K = intrinsics.K
    src = cv2.undistortPoints(pts, K, lens.coefficients, P=K).reshape(h, w, 2).astype(np.float32)
    return cv2.remap(image, src[..., 0], src[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def scene():
    return small_room(SEED, mapping_frames=60, relit_queries=8)


def radial_shift_px(lens: RadialDistortion, intrinsics: Intrinsics) -> np.ndarray:
    """How far ``lens`` moves points from 0 to the image corner's radius, in pixels."""
    r_max = np.hypot(intrinsics.width / 2, intrinsics.height / 2) / intrinsics.fx
    r = np.linspace(0.0, r_max, 50)
    return intrinsics.fx * r * (lens.k1 * r**2 + lens.k2 * r**4)


def test_estimate_recovers_a_barrel_lens_from_posed_images(scene) -> None:
    frames = [f.with_image(distort(f.image, f.intrinsics, LENS)) for f in scene.mapping]
    est = estimate_lens(frames)
    assert est.accepted, est.reason
    intr = frames[0].intrinsics
    # The lens moves the corners by ~8 px here; the estimate moves them within half a pixel of it.
    err = np.abs(radial_shift_px(est.distortion, intr) - radial_shift_px(LENS, intr)).max()
    assert np.abs(radial_shift_px(LENS, intr)).max() > 5.0
    assert err < 0.5, (est.distortion, err)
    assert est.median_px_after < est.median_px_before and est.held_out_gain > 0.1
    assert "removed" in lens_summary(est)


def test_pinhole_images_keep_a_zero_estimate(scene) -> None:
    est = estimate_lens(scene.mapping)
    assert not est.accepted and est.distortion.is_zero
    assert "pinhole kept" in lens_summary(est) and "held-out" in est.reason


def test_poses_without_rotation_give_no_pairs_and_no_estimate(scene) -> None:
    """A camera that only slides sideways (no pair turns between its views) cannot show the lens."""
    frames = [f for f in scene.mapping[:10]]
    slid = [f.__class__(f.image, f.intrinsics, make_pose(np.eye(3), [0.1 * i, 0.0, 0.0])) for i, f in enumerate(frames)]
    assert select_pairs(np.stack([f.T_world_cam for f in slid]), LensConfig()) == []
    est = estimate_lens(slid)
    assert not est.accepted and est.distortion.is_zero and "image pairs" in est.reason


def test_undistorter_inverts_the_lens(scene) -> None:
    frame = scene.mapping[0]
    distorted = distort(frame.image, frame.intrinsics, LENS)
    restored = ImageUndistorter()(distorted, frame.intrinsics, LENS.coefficients)
    h, w = frame.image.shape[:2]
    inner = (slice(h // 8, h - h // 8), slice(w // 8, w - w // 8))

    def err(a: np.ndarray) -> float:
        return float(np.abs(a[inner].astype(float) - frame.image[inner].astype(float)).mean())
    # What is left is the blur of two bilinear resamplings (about one grey level).
    assert err(restored) < 1.5 and err(restored) < 0.4 * err(distorted), (err(restored), err(distorted))
    # No distortion: the very same array back, no copy.
    assert ImageUndistorter()(distorted, frame.intrinsics, RadialDistortion().coefficients) is distorted


def test_lens_config_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_angle_deg"):
        LensConfig(min_angle_deg=50.0, max_angle_deg=40.0)
    with pytest.raises(ValueError, match="ratio"):
        LensConfig(ratio=0.0)
    with pytest.raises(ValueError, match="finite"):
        RadialDistortion(float("nan"), 0.0)


def test_mapping_lens_applies_to_its_camera_only_and_refuses_bad_metadata() -> None:
    camera = Intrinsics(300.0, 300.0, 159.5, 119.5, 320, 240)
    lens = MappingLens(camera, LENS)
    assert MappingLens.from_meta(lens.to_meta(), "x") == lens
    assert lens.applies_to(camera) and not lens.applies_to(Intrinsics(310.0, 310.0, 159.5, 119.5, 320, 240))
    with pytest.raises(ValueError, match="out of range"):
        MappingLens.from_meta({**lens.to_meta(), "k1": 3.0}, "x")
    with pytest.raises(ValueError, match="invalid lens metadata"):
        MappingLens.from_meta({"k1": -0.1, "k2": 0.0}, "x")


@pytest.fixture(scope="module")
def mapped_through_lens(scene, tmp_path_factory):
    """A room seen through ``LENS``, mapped with the shipped checkpoint (lens estimated), and the
    map reloaded from its file."""
    import torch

    from aceg_model.mapping import SceneMap, map_scene
    from aceg_model.model import AcegModel

    torch.manual_seed(0)
    through = lambda frames: [f.with_image(distort(f.image, f.intrinsics, LENS)) for f in frames]  # noqa: E731
    model = AcegModel.load(CHECKPOINT)
    scene_map, report = map_scene(model, through(scene.mapping), quick_mapping_config())
    path = tmp_path_factory.mktemp("lens") / "room.map"
    scene_map.save(path)
    return model, scene_map, SceneMap.load(path, model), report, through(scene.queries["lighting"])


def test_mapping_removes_the_lens_and_queries_localize_through_it(mapped_through_lens) -> None:
    from dataclasses import replace

    from aceg_model.geometry import pose_error
    from aceg_model.localizer import Localizer

    model, scene_map, loaded, report, queries = mapped_through_lens
    assert report.lens is not None and report.lens.accepted, report.lens
    assert loaded.lens == scene_map.lens and loaded.lens.camera == queries[0].intrinsics
    err = np.abs(radial_shift_px(loaded.lens.distortion, loaded.lens.camera)
                 - radial_shift_px(LENS, loaded.lens.camera)).max()
    assert err < 0.5, loaded.lens

    def median_error_cm(scene_map) -> float:
        loc = Localizer(model, scene_map)
        errors = []
        for f in queries:
            res = loc.localize(f.image, f.intrinsics)
            errors.append(100 * pose_error(res.T_world_cam, f.T_world_cam)[0] if res.success else np.inf)
            assert not res.success or ("undistort" in res.timings_ms) == (scene_map.lens is not None)
        return float(np.median(errors))
    # The reloaded map undistorts the queries; the same map with its lens dropped localizes the
    # distorted queries against undistorted landmarks, and worse.
    with_lens, without = median_error_cm(loaded), median_error_cm(replace(loaded, lens=None))
    # Measured: 0.23 cm with the lens removed, 5.5 cm without (8 relit queries).
    assert with_lens < 1.0, with_lens
    assert without > 3 * with_lens, (with_lens, without)


def test_ratio_matches_are_opencvs_brute_force_ratio_test() -> None:
    """The matrix-product ratio test keeps the same matches as OpenCV's brute-force k-NN, on
    SIFT-like descriptors (non-negative, integer-valued) where half of b are noisy copies of a."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 120, (400, 128)).astype(np.float32)
    b = np.concatenate([a[:200] + rng.normal(0, 8, (200, 128)), rng.integers(0, 120, (300, 128))]).astype(np.float32)
    b = b[rng.permutation(len(b))]
    ia, ib = ratio_matches(a, b, 0.8)
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a, b, k=2)
    expected = [(m.queryIdx, m.trainIdx) for m, n in knn if m.distance < 0.8 * n.distance]
    assert 150 < len(expected) <= 200
    assert list(zip(ia.tolist(), ib.tolist())) == expected
