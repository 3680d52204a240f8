"""Photo pairs: views of a real photo on a plane whose correspondences are exact."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from aceg_model.frames import Intrinsics
from aceg_model.model import AcegModel, ModelConfig
from aceg_model.photo_pairs import PLANE_WIDTH_M, PhotoPairs, look_at, plane_view, training_photos, vga_photo_pairs, vga_photos
from aceg_model.pretrain import PretrainConfig, pretrain
from aceg_model.pretrain_data import SceneViews, save_views, view_correspondences
from aceg_model.regressor import RegressorConfig

K = Intrinsics(200.0, 200.0, 159.5, 119.5, 320, 240)


def smooth_photo(seed: int = 0, h: int = 480, w: int = 640) -> np.ndarray:
    """A photo-like test image: smooth random colours with detail at several scales."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float32)
    for cell in (64, 16, 4):
        grid = rng.uniform(0, 1, (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        out += cv2.resize(grid, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)[:h, :w]
    return np.clip(out / 3 * 255, 0, 255).astype(np.uint8)


def test_a_photo_seen_square_on_is_the_photo_scaled_at_one_depth() -> None:
    photo = smooth_photo()
    distance = 0.6
    view = plane_view(photo, K, look_at(np.zeros(3), 0.0, 0.0, distance, 0.0))
    # Every pixel sees the plane at the camera's distance, at the point its ray meets.
    coords = view.meta["scene_coords"]
    v, u = np.nonzero(np.isfinite(coords[..., 0]))
    assert len(u) == K.width * K.height  # a 0.96 m wide footprint inside the 1 m photo
    np.testing.assert_allclose(view.depth[v, u], distance, rtol=1e-6)
    np.testing.assert_allclose(coords[v, u, 0], (u - K.cx) * distance / K.fx, atol=1e-6)
    np.testing.assert_allclose(coords[v, u, 1], (v - K.cy) * distance / K.fy, atol=1e-6)
    np.testing.assert_allclose(coords[v, u, 2], 0.0, atol=1e-6)
    # The image is the photo scaled about its centre (photo pixels per image pixel: m per
    # image pixel over m per photo pixel).
    s = (distance / K.fx) / (PLANE_WIDTH_M / photo.shape[1])
    M = np.array([[s, 0, photo.shape[1] / 2 - 0.5 - s * K.cx], [0, s, photo.shape[0] / 2 - 0.5 - s * K.cy]])
    expected = cv2.warpAffine(photo, M, (K.width, K.height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    assert np.abs(view.image.astype(int) - expected.astype(int)).mean() < 1.0


def test_two_tilted_views_of_a_photo_correspond_by_a_homography_and_look_alike_there() -> None:
    photo = smooth_photo(1)
    a = plane_view(photo, K, look_at(np.array([0.05, -0.02, 0.0]), 35.0, 20.0, 0.5, 10.0))
    b = plane_view(photo, K, look_at(np.array([0.0, 0.03, 0.0]), 45.0, 200.0, 0.4, -15.0))
    uv_a, uv_b = view_correspondences(a, b, K, K, 256, np.random.default_rng(0))
    assert len(uv_a) == 256
    # Two views of a plane: one homography joins all the matches (to the pixel grid's precision).
    H, _ = cv2.findHomography(uv_a, uv_b, 0)
    mapped = cv2.perspectiveTransform(uv_a[None].astype(np.float64), H)[0]
    assert np.abs(mapped - uv_b).max() < 0.05
    # And the matched pixels show the same part of the photo.
    grey_a = a.image.mean(-1)[uv_a[:, 1].astype(int), uv_a[:, 0].astype(int)]
    grey_b = cv2.remap(b.image.mean(-1).astype(np.float32), uv_b[:, :1].astype(np.float32),
                       uv_b[:, 1:].astype(np.float32), cv2.INTER_LINEAR)[:, 0]
    assert np.median(np.abs(grey_a - grey_b)) < 0.2 * np.median(np.abs(grey_a - np.roll(grey_b, 7)))


def test_pixels_whose_ray_misses_the_photo_have_no_surface() -> None:
    photo = smooth_photo(2, 120, 640)  # a wide photo: a frontal view sees past its top and bottom
    view = plane_view(photo, K, look_at(np.zeros(3), 0.0, 0.0, 0.6, 0.0))
    missed = ~np.isfinite(view.meta["scene_coords"][..., 0])
    assert missed[0].all() and missed[-1].all() and not missed[K.height // 2].any()
    assert (view.depth[missed] == 0).all()
    # A camera looking away from the plane sees none of it.
    behind = look_at(np.zeros(3), 0.0, 0.0, -0.5, 0.0)
    assert not np.isfinite(plane_view(photo, K, behind).meta["scene_coords"]).any()


def test_training_photos_leave_out_the_tuning_sequences_and_7scenes() -> None:
    sources = training_photos()
    assert any(s.startswith("skimage:") for s in sources)
    for tuning in ("seq06_", "Herz-Jesus", "7scenes", "redkitchen"):
        assert not any(tuning in s for s in sources)
    assert "skimage:text" not in sources  # not a photograph
    if any("strecha" in s for s in sources):  # ../shared/data is there: its other photos are used
        assert any("fountain-P11" in s for s in sources) and any("seq01_" in s for s in sources)


def test_vga_photos_are_the_strecha_training_photos_a_640x480_view_sees_unmagnified() -> None:
    sources = vga_photos()
    if not any("strecha" in s for s in training_photos()):
        pytest.skip("needs ../shared/data (the Strecha photos)")
    assert sources and set(sources) <= set(training_photos())
    assert all("strecha" in s and "Herz-Jesus" not in s for s in sources)
    # At the 1024 px that vga_photo_pairs loads them at, each has the rows of a 480 px view.
    pairs = vga_photo_pairs(sources[:3])
    assert min(pairs.photo(s).shape[0] for s in sources[:3]) >= 480


def test_photo_width_and_footprint_set_how_much_a_view_magnifies_the_photo() -> None:
    """The view's footprint on the plane (frontal) is distance * width / fx: a wider share of a
    wider photo shows more photo pixels per view pixel."""
    rng = np.random.default_rng(1)
    narrow = PhotoPairs(["skimage:astronaut"], max_tilt_deg=0.0, max_roll_deg=0.0)
    wide = PhotoPairs(["skimage:astronaut"], max_tilt_deg=0.0, max_roll_deg=0.0, photo_width=1024,
                      footprint=(0.6, 1.0))
    assert narrow.photo("skimage:astronaut").shape[1] == 640 and wide.photo("skimage:astronaut").shape[1] == 1024

    def photo_px_per_view_px(pairs: PhotoPairs) -> list[float]:
        out = []
        for _ in range(8):
            for view in pairs.pair(K, False, rng):
                distance_m = -view.T_world_cam[2, 3]  # untilted, the camera sits on the plane's normal at z < 0
                out.append(distance_m * K.width / K.fx / PLANE_WIDTH_M * pairs.photo_width / K.width)
        return out

    # The astronaut is square, so a 4:3 view's widest fill is the whole photo width.
    narrow_px, wide_px = photo_px_per_view_px(narrow), photo_px_per_view_px(wide)
    assert 0.35 * 2 - 1e-6 <= min(narrow_px) and max(narrow_px) <= 0.8 * 2 + 1e-6
    assert 0.6 * 3.2 - 1e-6 <= min(wide_px) and max(wide_px) <= 3.2 + 1e-6
    with pytest.raises(ValueError, match="footprint"):
        PhotoPairs(["skimage:astronaut"], footprint=(0.8, 0.5))


def test_photo_pairs_see_a_common_part_of_the_photo_from_different_sides() -> None:
    pairs = PhotoPairs(["skimage:astronaut", "skimage:coffee"], max_tilt_deg=50.0)
    rng = np.random.default_rng(0)
    counts, tilts = [], []
    for k in range(12):
        a, b = pairs.pair(K, query=k % 2 == 1, rng=rng)
        assert a.image.shape == (K.height, K.width, 3) and a.image.dtype == np.uint8
        counts.append(len(view_correspondences(a, b, K, K, 128, rng)[0]))
        tilts += [np.degrees(np.arccos(v.T_world_cam[2, 2])) for v in (a, b)]
    assert min(counts) >= 64  # every pair overlaps
    assert max(tilts) <= 50.0 + 1e-6 and max(tilts) > 25.0


def test_photo_pairs_need_an_encoder_only_run_and_a_probability() -> None:
    with pytest.raises(ValueError, match="encoder alone"):
        PretrainConfig(photo_pair_prob=0.5)
    with pytest.raises(ValueError, match="photo_pair_prob"):
        PretrainConfig(photo_pair_prob=1.5, w_coords=0.0, w_reproj=0.0)
    with pytest.raises(ValueError, match="no photos"):
        PhotoPairs([])


def test_pretraining_on_photo_pairs_trains_the_encoder_alone(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    bank.mkdir()
    save_views(SceneViews.generate(11, 64, mapping_frames=4, query_frames=2), bank / "scene-0000011.npz")
    tiny = ModelConfig(regressor=RegressorConfig(n_codes=32, n_layers=1), image_height=64)
    torch.manual_seed(5)
    start = AcegModel(tiny)
    start.save(tmp_path / "start.safetensors")
    cfg = PretrainConfig(steps=2, scenes_in_pool=1, scenes_per_step=1, nce_points=128, render_height=64,
                         log_every=1, bank=str(bank), init=str(tmp_path / "start.safetensors"), w_coords=0.0,
                         w_reproj=0.0, lr=1e-3, photo_pair_prob=1.0)
    out = AcegModel.load(pretrain(cfg, tmp_path / "run", resume=False))
    before, after = start.state_dict(), out.state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items() if k.startswith("regressor."))
    assert any(not torch.equal(before[k], v) for k, v in after.items() if k.startswith("encoder."))
    # Both iterations of both steps had a correspondence loss on the photo pair.
    log = (tmp_path / "run" / "pretrain_log.jsonl").read_text().splitlines()
    assert len(log) == 2 and all('"nce": ' in line and '"nce": null' not in line for line in log)
