"""Visits (aceg_model.visits): landmarks kept to the stretch of the mapping sequence they were
seeded in. The masked landmark search, the sweep's neighbour order, the localizer's re-solve
within the nearest visit, the map file's record of the views, and mapping a room whose second
visit's poses drifted. Also the sweep's share of wide-baseline neighbours, which keeps to the
visits' order."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from aceg_model.frames import Intrinsics
from aceg_model.geometry import make_pose, pose_error
from aceg_model.landmarks import SweepConfig, neighbour_views
from aceg_model.pnp import PnPConfig, solve_pnp
from aceg_model.mapping import SceneMap, make_head
from aceg_model.model import AcegModel
from aceg_model.regressor import LandmarkIndex, Regressor
from aceg_model.safe_files import FileFormatError, load_tensors, save_tensors
from aceg_model.visits import MappingViews, VisitConfig, same_visit, solve_in_visit, visit_masks

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"


def test_masked_search_finds_the_best_allowed_landmarks() -> None:
    g = torch.Generator().manual_seed(0)
    keys_MK = torch.nn.functional.normalize(torch.randn(1, 4096, 64, generator=g), dim=-1)
    index = LandmarkIndex.build(keys_MK, torch.zeros(1, 4096, 3))
    q_1bK = torch.nn.functional.normalize(torch.randn(1, 300, 64, generator=g), dim=-1)
    allowed_M = torch.rand(4096, generator=g) < 0.3
    found = Regressor.search(q_1bK, index, 16, allowed_M)[0]
    assert allowed_M[found].all()
    # The best 16 of the allowed landmarks' scores, as a brute-force top-k finds them (up to the
    # search's bfloat16 rounding, ~0.004 on a cosine, where the CPU has bfloat16).
    scores = (q_1bK[0] @ keys_MK[0].T).masked_fill(~allowed_M, float("-inf"))
    kth_best = scores.topk(16, dim=-1).values[:, -1:]
    assert (scores.gather(1, found) >= kth_best - 0.01).all()
    assert len(set(found[0].tolist())) == 16
    assert torch.equal(Regressor.search(q_1bK, index, 16, torch.ones(4096, dtype=torch.bool)),
                       Regressor.search(q_1bK, index, 16))


def test_visit_masks_keep_each_view_to_its_visit_and_fall_back_where_it_has_too_few() -> None:
    stamps_I = torch.tensor([0.0, 1.0, 2.0, 60.0, 61.0, 200.0], dtype=torch.float64)
    seed_view_M = torch.tensor([0, 1, 2, 3, 4, 0, 1, 3, 5])
    masks = visit_masks(same_visit(stamps_I, 10.0), seed_view_M, min_count=2)
    assert masks[0].tolist() == [True, True, True, False, False, True, True, False, False]
    assert masks[3].tolist() == [False, False, False, True, True, False, False, True, False]
    assert masks[5] is None  # one landmark of its own: it may attend to all
    # A sequence within one visit: no masks at all (the unmasked search).
    assert visit_masks(same_visit(stamps_I[:3], 10.0), torch.tensor([0, 1, 2, 0]), min_count=2) is None
    assert same_visit(stamps_I, 10.0)[0].tolist() == [True, True, True, False, False, False]


def test_sweep_neighbours_come_from_the_own_visit_first() -> None:
    # Two passes along the same line, the second 60 s later: views 0-9 and 10-19 at the same places.
    x = np.tile(np.arange(10) * 0.1, 2)
    T_cam_map = torch.as_tensor(np.stack([np.linalg.inv(make_pose(np.eye(3), [xi, 0.0, 0.0])) for xi in x]),
                                dtype=torch.float32)
    stamps = torch.as_tensor(np.r_[np.arange(10.0), 60 + np.arange(10.0)], dtype=torch.float64)
    cfg = SweepConfig(n_neighbours=12)
    plain = neighbour_views(T_cam_map, cfg)
    visits = neighbour_views(T_cam_map, cfg, same_visit(stamps, 10.0))
    assert (plain[0, :9] >= 10).any()  # the other pass's views are as close
    assert (visits[0, :9] < 10).all() and (visits[0, 9:] >= 10).all()  # own visit first, then the other
    assert (visits[15, :9] >= 10).all()


def test_wide_neighbours_come_first_and_keep_to_the_own_visit() -> None:
    # One pass along a line, 2 cm per view, all looking along +z; views 0-5 are one visit.
    T_cam_map = torch.as_tensor(np.stack([np.linalg.inv(make_pose(np.eye(3), [0.02 * i, 0.0, 0.0]))
                                          for i in range(20)]), dtype=torch.float32)
    cfg = SweepConfig(n_neighbours=4, n_wide=2, min_baseline_m=0.05, wide_baseline_m=0.15)
    assert neighbour_views(T_cam_map, cfg)[0].tolist() == [8, 9, 3, 4]  # >= 15 cm, then >= 5 cm
    assert neighbour_views(T_cam_map, replace(cfg, n_wide=0))[0].tolist() == [3, 4, 5, 6]
    # Its own visit holds no view 15 cm away: the wide places go to its near views, not another visit.
    stamps = torch.as_tensor(np.r_[np.arange(6.0), 60 + np.arange(14.0)], dtype=torch.float64)
    assert neighbour_views(T_cam_map, cfg, same_visit(stamps, 10.0))[0].tolist() == [3, 4, 5, 6]
    assert neighbour_views(T_cam_map, replace(cfg, n_wide=9))[0].tolist() == [8, 9, 10, 11]  # all wide
    with pytest.raises(ValueError, match="n_wide"):
        SweepConfig(n_wide=-1)
    with pytest.raises(ValueError, match="wide_baseline_m"):
        SweepConfig(min_baseline_m=0.2, wide_baseline_m=0.15)


def drifted_correspondences(shift_m: float):
    """A camera at the origin seeing 600 points 2-3 m ahead; the points seeded in visit B (at 60 s)
    sit ``shift_m`` off along x, as that visit's drifted poses would have placed them. Visit A's
    views are where the camera is, visit B's 0.6 m away."""
    rng = np.random.default_rng(1)
    intr = Intrinsics(300.0, 300.0, 159.5, 119.5, 320, 240)
    pts = np.c_[rng.uniform(-1.2, 1.2, 600), rng.uniform(-0.9, 0.9, 600), rng.uniform(2.0, 3.0, 600)]
    uv = pts[:, :2] / pts[:, 2:] * 300.0 + [159.5, 119.5]
    seed_view = np.where(np.arange(600) % 2 == 0, rng.integers(0, 5, 600), rng.integers(5, 10, 600))
    coords = pts + np.where(seed_view[:, None] >= 5, [shift_m, 0.0, 0.0], 0.0)
    poses = np.stack([make_pose(np.eye(3), [0.02 * i, 0.0, 0.0]) for i in range(5)]
                     + [make_pose(np.eye(3), [0.6 + 0.02 * i, 0.0, 0.0]) for i in range(5)])
    views = MappingViews.from_poses(poses, np.r_[np.arange(5.0), 60 + np.arange(5.0)], seed_view, 10.0)
    return intr, coords, uv, views


def test_solve_in_visit_takes_the_nearest_visits_landmarks() -> None:
    intr, coords, uv, views = drifted_correspondences(0.03)
    pnp, best = PnPConfig(top_k=None), np.arange(600)  # landmark i is correspondence i
    first = solve_pnp(coords, uv, intr, pnp)
    assert first.success and first.n_inliers > 500  # 3 cm at 2-3 m is within the 8 px threshold
    again, keep = solve_in_visit(first, views, best, coords, uv, np.ones(600), intr, pnp)
    assert keep.sum() == 300 and (views.seed_view_M[keep] < 5).all()
    first_cm = 100 * pose_error(first.T_world_cam, np.eye(4))[0]
    again_cm = 100 * pose_error(again.T_world_cam, np.eye(4))[0]
    assert again_cm < 0.1 and first_cm > 0.5, (first_cm, again_cm)
    # Too few landmarks in the visit: the first pose stands, with all its correspondences.
    same, keep = solve_in_visit(first, views, best, coords, uv, np.ones(600), intr, replace(pnp, min_inliers=301))
    assert same is first and keep.all()


def test_mapping_views_refuse_bad_values() -> None:
    poses = np.stack([np.eye(4)] * 3)
    with pytest.raises(ValueError, match="seed views must lie in"):
        MappingViews.from_poses(poses, np.arange(3.0), np.array([0, 3]), 10.0)
    with pytest.raises(ValueError, match="finite"):
        MappingViews.from_poses(poses, np.array([0.0, np.nan, 2.0]), np.array([0, 1]), 10.0)
    with pytest.raises(ValueError, match="window_s"):
        MappingViews.from_poses(poses, np.arange(3.0), np.array([0, 1]), 0.0)
    with pytest.raises(ValueError, match="window_s"):
        VisitConfig(window_s=-1.0)
    assert not VisitConfig(window_s=0.0).enabled


@pytest.fixture(scope="module")
def model() -> AcegModel:
    return AcegModel.load(CHECKPOINT)


def test_map_file_round_trips_the_views_and_refuses_bad_ones(model, tmp_path: Path) -> None:
    M = model.config.regressor.n_codes
    rng = np.random.default_rng(0)
    poses = np.stack([make_pose(Rotation.random(random_state=i).as_matrix(), rng.normal(size=3)) for i in range(7)])
    stamps = 1.7e9 + np.arange(7) * 3.3  # bag stamps: float32 would round them to 128 s
    views = MappingViews.from_poses(poses, stamps, rng.integers(0, 7, M), 10.0)
    scene_map = SceneMap(make_head(model, "aceg"), np.zeros(3), {"model_hash": model.model_hash()}, views=views)
    scene_map.save(tmp_path / "a.map")
    loaded = SceneMap.load(tmp_path / "a.map", model).views
    assert np.array_equal(loaded.stamps_I, stamps) and np.array_equal(loaded.seed_view_M, views.seed_view_M)
    assert np.allclose(loaded.centres_I3, views.centres_I3, atol=1e-6) and loaded.window_s == 10.0
    assert loaded.nearest_view(poses[4]) == 4
    assert SceneMap.load(tmp_path / "a.map", model).meta["visit_window_s"] == 10.0

    views.seed_view_M[0] = 7  # a seed image the map does not have
    scene_map.save(tmp_path / "b.map")
    with pytest.raises(ValueError, match="invalid mapping views: .*seed views must lie in"):
        SceneMap.load(tmp_path / "b.map", model)
    # The ACE-style baseline has no landmarks to keep to visits.
    ace = SceneMap(make_head(model, "ace"), np.zeros(3), {"model_hash": model.model_hash()})
    ace.save(tmp_path / "c.map")
    tensors, meta = load_tensors(tmp_path / "c.map", kind="aceg-map")
    save_tensors(tmp_path / "d.map", tensors, {**meta, "visit_window_s": 10.0}, kind="aceg-map")
    with pytest.raises(ValueError, match="invalid visit_window_s"):
        SceneMap.load(tmp_path / "d.map", model)
    save_tensors(tmp_path / "e.map", {k: v for k, v in load_tensors(tmp_path / "a.map", kind="aceg-map")[0].items()
                                      if k != "views.stamps"},
                 {**meta, "method": "aceg", "visit_window_s": 10.0}, kind="aceg-map")
    with pytest.raises(FileFormatError, match="missing \\['views.stamps'\\]"):
        SceneMap.load(tmp_path / "e.map", model)


def test_mapping_patches_choose_among_the_landmarks_of_their_visit(model) -> None:
    from aceg_model.heads import CodesHead
    from aceg_model.mapping import all_candidates

    M, k = model.config.regressor.n_codes, model.config.regressor.attention_top_k
    g = torch.Generator().manual_seed(0)
    head = CodesHead(model.regressor, model.regressor.init_codes(1, g)[0])
    stamps_I = torch.tensor([0.0, 5.0, 60.0, 65.0], dtype=torch.float64)
    seed_view_M = torch.randint(0, 4, (M,), generator=g)
    masks = visit_masks(same_visit(stamps_I, 10.0), seed_view_M, k)
    feats_NF = torch.randn(4 * 50, model.config.encoder.out_dim, generator=g).half()  # image-major, 50 patches each
    cand_Nk = all_candidates(head, feats_NF, 64, best_first=True, masks=masks).long()
    first_visit_N = (torch.arange(200) < 100)[:, None]
    assert (seed_view_M[cand_Nk] < 2).eq(first_visit_N).all()  # every candidate from the patch's own visit
    free_Nk = all_candidates(head, feats_NF, 64, best_first=True).long()
    assert not (seed_view_M[free_Nk] < 2).eq(first_visit_N).all()  # unrestricted, they mix
    # Mapping searches only the patches its next batches hold: those rows come out the same.
    rows_R = torch.tensor([0, 3, 49, 50, 120, 199])
    some_Nk = all_candidates(head, feats_NF, 64, best_first=True, masks=masks, rows_R=rows_R).long()
    assert torch.equal(some_Nk[rows_R], cand_Nk[rows_R])
    others = torch.ones(200, dtype=torch.bool)
    others[rows_R] = False
    assert (some_Nk[others] == -1).all()
    assert torch.equal(all_candidates(head, feats_NF, 4, best_first=True, rows_R=rows_R).long()[rows_R], free_Nk[rows_R])
