"""Real posed pairs for the encoder: their epipolar geometry, the loss on it, and its place in pre-training."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from aceg_model.datasets import write_posed_folder
from aceg_model.epipolar_pairs import EpipolarPairs, fundamental, line_distances, lines_in_crop, point_line_distances
from aceg_model.losses import epipolar_nce
from aceg_model.model import AcegModel, ModelConfig
from aceg_model.pretrain import PretrainConfig, epipolar_pair_loss, fine_epipolar_loss
from aceg_model.pretrain_data import SceneViews, save_views
from aceg_model.regressor import RegressorConfig
from aceg_model.scene import correspondences
from conftest import first_logged_steps, loss_before_and_after, shared_dataset, small_room

TINY = ModelConfig(regressor=RegressorConfig(n_codes=32, n_layers=1), image_height=64)
FOUNTAIN = "strecha-mvs-gt/fountain-P11"


def test_rendered_matches_lie_on_the_epipolar_lines_of_a_loaded_sequence(tmp_path: Path) -> None:
    scene = small_room(7, mapping_frames=12)
    write_posed_folder(scene.mapping[:6], tmp_path / "seq")
    pairs = EpipolarPairs(120, data_dir=tmp_path, sequences=("seq",), max_gap=2)
    assert len(pairs.images) == 6 and pairs.pairs == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5),
                                                      (0, 2), (1, 3), (2, 4), (3, 5)]
    assert pairs.images[0].image_hw.shape == (120, 160)  # the working height, 4:3 kept
    uv_a, uv_b = correspondences(scene.mapping[1], scene.mapping[2], 200, np.random.default_rng(0))
    assert len(uv_a) > 50
    # The loaded images are half the rendered size: pixel centres map by (u + 0.5) / 2 - 0.5.
    half = lambda uv: (uv + 0.5) / 2 - 0.5  # noqa: E731
    d = line_distances(fundamental(pairs.images[1], pairs.images[2]), half(uv_a), half(uv_b))
    assert np.median(d) < 0.02 and d.max() < 0.1
    # A wrong pose does not: the same matches miss the lines of a pair it was not taken from.
    assert np.median(line_distances(fundamental(pairs.images[1], pairs.images[4]), half(uv_a), half(uv_b))) > 1.0


def test_crop_lines_at_the_fine_scale_pass_through_the_rendered_matches(tmp_path: Path) -> None:
    scene = small_room(7, mapping_frames=12)
    write_posed_folder(scene.mapping[:6], tmp_path / "seq")
    pairs = EpipolarPairs(120, data_dir=tmp_path, sequences=("seq",), max_gap=1, fine_scale=3)
    a, b = pairs.images[1].fine, pairs.images[2].fine
    assert a.image_hw.shape == (360, 480)  # three times the working height, from the rendered 240
    uv_a, uv_b = correspondences(scene.mapping[1], scene.mapping[2], 200, np.random.default_rng(0))
    fine = lambda uv: (uv + 0.5) * 1.5 - 0.5  # noqa: E731  (rendered at 240, loaded at 360)
    origin_a, origin_b = np.array([40.0, 16.0]), np.array([64.0, 88.0])
    in_crop_a, in_crop_b = fine(uv_a) - origin_a, fine(uv_b) - origin_b
    d = point_line_distances(lines_in_crop(fundamental(a, b), in_crop_a, origin_a, origin_b), in_crop_b)
    assert np.median(d) < 0.05 and d.max() < 0.3
    # Without the shift into b's crop the same matches miss their lines.
    unshifted = lines_in_crop(fundamental(a, b), in_crop_a, origin_a, np.zeros(2))
    assert np.median(point_line_distances(unshifted, in_crop_b)) > 5.0


def test_epipolar_nce_counts_the_cells_near_the_line_as_positives() -> None:
    torch.manual_seed(0)
    feats_b = torch.randn(32, 10, 12)
    point = feats_b[:, 4, 7][None]  # the feature of cell (row 4, column 7), centred at (59.5, 35.5)
    through = torch.tensor([[0.0, 1.0, -35.5]])  # y = 35.5: row 4's centres
    beside = torch.tensor([[0.0, 1.0, -51.5]])  # y = 51.5: row 6's centres
    on_line = epipolar_nce(point, feats_b, through, band_px=3.0).item()
    off_line = epipolar_nce(point, feats_b, beside, band_px=3.0).item()
    assert on_line < 0.05 and off_line > 5.0
    # Twelve positives out of 120 cells: equal features give log(120 / 12).
    flat = torch.ones(32, 10, 12)
    assert epipolar_nce(flat[:, 0, 0][None], flat, through, 3.0).item() == pytest.approx(np.log(10), rel=1e-5)
    # A line that misses the image (or covers all of it) says nothing.
    assert epipolar_nce(point, feats_b, torch.tensor([[0.0, 1.0, -500.0]]), 3.0) is None
    assert epipolar_nce(point, feats_b, through, band_px=1000.0) is None


def test_epipolar_pairs_refuse_missing_sequences_and_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        EpipolarPairs(64, data_dir=tmp_path, sequences=("nowhere",))
    with pytest.raises(ValueError, match="max_gap"):
        EpipolarPairs(64, data_dir=tmp_path, max_gap=0)
    with pytest.raises(ValueError, match="epi_points"):
        PretrainConfig(w_epi=0.5, epi_points=4)
    with pytest.raises(ValueError, match="w_epi"):
        PretrainConfig(w_epi=-1.0)
    with pytest.raises(ValueError, match="w_epi_fine"):
        PretrainConfig(w_epi_fine=0.5)  # the fine term's crops are placed by the coarse term's features
    with pytest.raises(ValueError, match="fine_scale"):
        EpipolarPairs(64, data_dir=tmp_path, fine_scale=0)


def test_loaded_strecha_poses_agree_with_sift_matches_of_the_images() -> None:
    root = shared_dataset(FOUNTAIN).parents[1]
    pairs = EpipolarPairs(240, data_dir=root, sequences=(FOUNTAIN,), max_gap=1)
    a, b = pairs.images[4], pairs.images[5]
    grey = [(x.image_hw * 255).astype(np.uint8) for x in (a, b)]
    sift = cv2.SIFT_create(2000)
    (ka, da), (kb, db) = (sift.detectAndCompute(g, None) for g in grey)
    good = [m for m, n in cv2.BFMatcher().knnMatch(da, db, k=2) if m.distance < 0.7 * n.distance]
    pa = np.float32([ka[m.queryIdx].pt for m in good])
    pb = np.float32([kb[m.trainIdx].pt for m in good])
    _, kept = cv2.findFundamentalMat(pa, pb, cv2.FM_RANSAC, 1.0)  # the images' own geometry, not the poses
    kept = kept.ravel().astype(bool)
    assert kept.sum() > 40
    # OpenCV keypoints and our pixels both put pixel centres on integers.
    assert np.median(line_distances(fundamental(a, b), pa[kept], pb[kept])) < 0.5


def test_the_epipolar_term_trains_the_encoder_on_a_real_pair() -> None:
    root = shared_dataset(FOUNTAIN).parents[1]
    pairs = EpipolarPairs(TINY.image_height, data_dir=root, sequences=(FOUNTAIN,), max_gap=1)
    torch.manual_seed(0)
    model = AcegModel(TINY)
    cfg = PretrainConfig(model=TINY, w_coords=0.0, w_reproj=0.0, w_epi=1.0, epi_points=64, epi_band_px=4.0)
    a, b = pairs.images[2], pairs.images[3]

    # The same points each time.
    start, end = loss_before_and_after(lambda: epipolar_pair_loss(model, a, b, cfg, False, np.random.default_rng(1))[0],
                                       model.encoder.parameters(), 30)
    assert end < 0.7 * start


def test_the_fine_epipolar_term_trains_the_encoder_on_a_real_pair() -> None:
    root = shared_dataset(FOUNTAIN).parents[1]
    pairs = EpipolarPairs(TINY.image_height, data_dir=root, sequences=(FOUNTAIN,), max_gap=1, fine_scale=3)
    torch.manual_seed(0)
    model = AcegModel(TINY)
    cfg = PretrainConfig(model=TINY, w_coords=0.0, w_reproj=0.0, w_epi=1.0, w_epi_fine=1.0, fine_crop_px=32,
                         fine_points=32)
    a, b = pairs.images[2], pairs.images[3]
    with torch.no_grad():
        coarse = model.encoder(torch.from_numpy(np.stack([a.image_hw, b.image_hw]))[:, None])
    # The same crops and points each time; b's crop stays where the starting features put it.
    start, end = loss_before_and_after(
        lambda: fine_epipolar_loss(model, a, b, coarse, 1.0, cfg, np.random.default_rng(1)),
        model.encoder.parameters(), 30)
    assert end < 0.7 * start
    coarse_only = EpipolarPairs(TINY.image_height, data_dir=root, sequences=(FOUNTAIN,), max_gap=1)
    with pytest.raises(ValueError, match="fine scale"):
        fine_epipolar_loss(model, coarse_only.images[2], coarse_only.images[3], coarse, 1.0, cfg,
                           np.random.default_rng(1))


def test_pretrain_adds_the_epipolar_term_on_the_same_draws(tmp_path: Path) -> None:
    shared_dataset(FOUNTAIN)  # pre-training reads the shared sequences
    for seed in (11, 12):
        save_views(SceneViews.generate(seed, 64, mapping_frames=4, query_frames=2), tmp_path / f"scene-{seed:07d}.npz")
    logs = first_logged_steps(tmp_path, tmp_path, TINY, {"off": {}, "on": {"w_epi": 0.5},
                                                         "fine": {"w_epi": 0.5, "w_epi_fine": 0.25, "fine_crop_px": 32}})
    on, off, fine = logs["on"]["mapping"], logs["off"]["mapping"], logs["fine"]["mapping"]
    # The epipolar term draws from its own random stream: the mapping iteration's views and matches
    # are those of a run without it.
    assert on["nce"] == pytest.approx(off["nce"], abs=1e-6)
    assert off["epi"] is None and on["epi"] > 0
    assert on["loss"] == pytest.approx(0.5 * on["nce"] + 0.5 * on["epi"], rel=1e-5)
    # The fine epipolar term has a stream of its own too: the coarse term's pair and points stay.
    assert fine["nce"] == pytest.approx(on["nce"], abs=1e-6) and fine["epi"] == pytest.approx(on["epi"], abs=1e-6)
    assert on["epi_fine"] is None and fine["epi_fine"] > 0
    assert fine["loss"] == pytest.approx(0.5 * fine["nce"] + 0.5 * fine["epi"] + 0.25 * fine["epi_fine"], rel=1e-5)


def test_no_tuning_or_evaluation_sequence_is_a_training_pair() -> None:
    from aceg_model.epipolar_pairs import EPIPOLAR_SEQUENCES
    from aceg_model.photo_pairs import TUNING_SEQUENCES

    for seq in EPIPOLAR_SEQUENCES:
        assert not any(t in seq for t in TUNING_SEQUENCES) and "7scenes" not in seq
