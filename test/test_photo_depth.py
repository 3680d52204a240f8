"""The raw-pixel steps on a generated room with rendered depth: NCC sharpening of landmark depths
in mapping (aceg_model.photo_depth) and the photometric placement of landmarks in a query
(aceg_model.photometric_refinement)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_room

from dataclasses import replace
from pathlib import Path

from aceg_model.landmarks import SweepConfig, neighbour_views
from aceg_model.mapping import cache_features, seed_codes
from aceg_model.model import AcegModel, ModelConfig
from aceg_model.geometry import invert
from aceg_model.photo_depth import GreyViews, PhotoDepthConfig, grey_image, landmark_windows, refine_depths
from aceg_model.photometric_refinement import refine_observations
from aceg_model.scene.correspondences import project

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"
SEED = 900021  # held out: pre-training banks use seeds below 100000
N_CANDIDATES = 400


@pytest.fixture(scope="module")
def scene():
    return small_room(SEED, mapping_frames=24, relit_queries=3, light_gain=0.6)


@pytest.fixture(scope="module")
def room(scene):
    """Grey views of a small handheld room, and random mapping patches with their rendered depths."""
    model = AcegModel(ModelConfig(image_height=120))  # only the patch grid is used: no weights needed
    centre = np.mean([f.T_world_cam[:3, 3] for f in scene.mapping], axis=0)
    cache = cache_features(model, scene.mapping, centre, grey_scale=2)
    gen = torch.Generator().manual_seed(0)
    sel = torch.randperm(len(cache.pixels_N2), generator=gen)[:N_CANDIDATES]
    images, pixels = cache.image_idx_N[sel], cache.pixels_N2[sel]
    truth = []
    for i, (u, v) in zip(images.tolist(), pixels.tolist()):
        depth = scene.mapping[i].depth  # 240 px high: 2x the working grid, pixel-centre convention
        truth.append(float(depth[int(round((v + 0.5) * 2 - 0.5)), int(round((u + 0.5) * 2 - 0.5))]))
    truth = torch.tensor(truth)
    ok = truth > 0
    neigh = neighbour_views(cache.T_cam_map_I44, SweepConfig(n_neighbours=8))
    return cache, neigh, images[ok], pixels[ok], truth[ok]


def test_ncc_recovers_depths_from_a_few_percent_off(room) -> None:
    """Depths 2-4 % off either way (the sweep's typical error) come back to well under 1 %."""
    cache, neigh, images, pixels, truth = room
    gen = torch.Generator().manual_seed(1)
    sign = torch.where(torch.rand(len(truth), generator=gen) < 0.5, -1.0, 1.0)
    start = truth * (1 + sign * (0.02 + 0.02 * torch.rand(len(truth), generator=gen)))
    refined, ncc = refine_depths(cache.grey_views, cache.T_cam_map_I44, neigh, images, pixels, start)
    before = ((start - truth).abs() / truth)
    after = ((refined - truth).abs() / truth)
    assert before.median() > 0.02
    assert after.median() < 0.005, after.median()
    assert (after < before).float().mean() > 0.8
    assert torch.isfinite(ncc).float().mean() > 0.8  # the rest: windows near the border seen by < 2 views


def test_depths_stay_where_nothing_can_be_compared(room) -> None:
    """Non-finite depths, views without neighbours and textureless windows keep what they had."""
    cache, neigh, images, pixels, truth = room
    start = truth.clone()
    start[:5] = float("nan")
    flat = GreyViews(torch.full_like(cache.grey_views.grey_IHW, 128), cache.grey_views.K_I33, 2)
    refined, ncc = refine_depths(flat, cache.T_cam_map_I44, neigh, images, pixels, start * 1.03)
    assert torch.equal(refined[5:], start[5:] * 1.03) and refined[:5].isnan().all()
    no_neighbours = torch.full_like(neigh, -1)
    refined, ncc = refine_depths(cache.grey_views, cache.T_cam_map_I44, no_neighbours, images, pixels, start * 1.03)
    assert torch.equal(refined[5:], start[5:] * 1.03) and torch.isinf(ncc).all()


def surface_gap(positions_M3: torch.Tensor, T_cam_map_I44: torch.Tensor, K_I33: torch.Tensor, frames) -> torch.Tensor:
    """Per landmark, the smallest relative gap between its depth and the rendered depth at its
    pixel over the mapping views that see it: how far it is from the surface."""
    gaps = torch.full((len(positions_M3),), float("inf"))
    for i, frame in enumerate(frames):
        depth = torch.as_tensor(frame.depth)
        pts = positions_M3 @ T_cam_map_I44[i, :3, :3].T + T_cam_map_I44[i, :3, 3]
        uv = pts @ K_I33[i].T
        u, v = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2]  # the working resolution is the images' own here
        ok = (pts[:, 2] > 0.1) & (u >= 0) & (v >= 0) & (u <= depth.shape[1] - 1) & (v <= depth.shape[0] - 1)
        d = depth[v.round().long().clamp(0, depth.shape[0] - 1), u.round().long().clamp(0, depth.shape[1] - 1)]
        ok &= d > 0
        gaps = torch.where(ok, torch.minimum(gaps, (pts[:, 2] - d).abs() / d), gaps)
    return gaps


def test_mapping_seeds_sit_closer_to_the_surface_with_ncc(scene, monkeypatch: pytest.MonkeyPatch) -> None:
    """``seed_codes`` with the shipped checkpoint: the same landmarks, sharpened by NCC, are
    nearer the rendered surface than where the plane sweep alone put them, whether the NCC step
    compares against the sweep's views or against its own set without the wide share (``n_wide=0``)."""
    model = AcegModel.load(CHECKPOINT)
    model.config.regressor = replace(model.config.regressor, n_codes=2000)
    centre = np.mean([f.T_world_cam[:3, 3] for f in scene.mapping], axis=0)
    cache = cache_features(model, scene.mapping, centre, sweep_scale=3, grey_scale=2)
    # Its 24 views are all over 15 cm apart, so the wide share begins past view 0's first neighbour here.
    near = neighbour_views(cache.T_cam_map_I44, SweepConfig(n_neighbours=8, n_wide=0))
    centres = torch.linalg.inv(cache.T_cam_map_I44)[:, :3, 3]
    sweep = SweepConfig(n_neighbours=8, n_wide=4, wide_baseline_m=1.01 * (centres[0] - centres[near[0, 0]]).norm().item())
    compared = []  # the views each NCC run compares against

    def recording(views, T, neigh_In, *args):
        compared.append(neigh_In)
        return refine_depths(views, T, neigh_In, *args)

    monkeypatch.setattr("aceg_model.mapping.refine_depths", recording)
    positions = {}
    for name, photo in (("sweep", None), ("ncc", PhotoDepthConfig(n_wide=None)), ("ncc_near", PhotoDepthConfig(n_wide=0))):
        codes, _, _ = seed_codes(model, cache, 2.0, torch.Generator().manual_seed(0), sweep, photo=photo)
        positions[name] = codes[:, -3:]
    assert torch.equal(compared[0], neighbour_views(cache.T_cam_map_I44, sweep))
    assert torch.equal(compared[1], neighbour_views(cache.T_cam_map_I44, replace(sweep, n_wide=0)))
    assert not torch.equal(compared[0], compared[1])
    gap = {k: surface_gap(p, cache.T_cam_map_I44, cache.K_I33, scene.mapping) for k, p in positions.items()}
    seen = gap["sweep"].isfinite() & gap["ncc"].isfinite() & gap["ncc_near"].isfinite()
    assert seen.float().mean() > 0.9
    sweep_gap = gap["sweep"][seen].median().item()
    for name in ("ncc", "ncc_near"):
        assert gap[name][seen].median().item() < 0.6 * sweep_gap, (name, gap[name][seen].median().item(), sweep_gap)
    with pytest.raises(ValueError, match="grey views"):
        seed_codes(model, replace(cache, grey_views=None), 2.0, torch.Generator(), sweep, photo=PhotoDepthConfig())


@pytest.mark.parametrize("bad", [dict(scale=0), dict(radius_px=0), dict(n_depths=2), dict(span=0.0),
                                 dict(span=1.5), dict(min_ncc=1.0), dict(n_wide=-1)])
def test_bad_settings_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        PhotoDepthConfig(**bad)


def test_query_observations_land_where_the_landmarks_are_seen(scene, room) -> None:
    """Landmarks on the rendered surface, windows from their mapping images; in relit queries whose
    pose is off by ~2 cm and 0.5 deg, the NCC search moves each projection from a few pixels off
    to a fraction of a pixel from where the true pose projects the landmark."""
    cache, _, images, pixels, truth = room
    views = cache.grey_views  # 2x the working grid, here the images' own resolution
    T = cache.T_cam_map_I44[images]
    rays = torch.nn.functional.pad(pixels, (0, 1), value=1.0) @ torch.linalg.inv(cache.K_I33[images]).transpose(1, 2)
    pts_cam = rays[torch.arange(len(images)), torch.arange(len(images))] * truth[:, None]
    T_map_cam = torch.linalg.inv(T)
    positions = torch.einsum("mij,mj->mi", T_map_cam[:, :3, :3], pts_cam) + T_map_cam[:, :3, 3]
    windows = landmark_windows(views, cache.T_cam_map_I44, images, positions, radius_px=4)
    centre = torch.as_tensor(np.mean([f.T_world_cam[:3, 3] for f in scene.mapping], axis=0), dtype=torch.float32)
    world = positions + centre
    ids = torch.arange(len(world))
    before_all, after_all, kept = [], [], []
    for frame in scene.queries["lighting"]:
        grey, K = grey_image(frame.image, frame.intrinsics, 120, 2)
        wrong = frame.T_world_cam.copy()
        wrong[:3, 3] += [0.015, -0.012, 0.01]
        c, s_ = np.cos(np.radians(0.5)), np.sin(np.radians(0.5))
        wrong[:3, :3] = wrong[:3, :3] @ np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]])
        uv_true, z = project(world.double().numpy(), frame)
        uv_wrong, _ = project(world.double().numpy(), replace(frame, T_world_cam=wrong))
        found, ok = refine_observations(windows, ids, world, grey, torch.as_tensor(K.K, dtype=torch.float32),
                                        torch.as_tensor(invert(wrong), dtype=torch.float32), search_px=6, min_ncc=0.5)
        inside = (z > 0) & (uv_true[:, 0] > 10) & (uv_true[:, 0] < K.width - 10) & (uv_true[:, 1] > 10) \
            & (uv_true[:, 1] < K.height - 10)
        use = ok.numpy() & inside
        before_all.append(np.linalg.norm(uv_wrong - uv_true, axis=1)[use])
        after_all.append(np.linalg.norm(found.numpy() - uv_true, axis=1)[use])
        kept.append(use.sum() / max(inside.sum(), 1))
    before, after = np.concatenate(before_all), np.concatenate(after_all)
    assert len(after) > 50 and np.mean(kept) > 0.3, (len(after), kept)
    assert np.median(before) > 2.0
    assert np.median(after) < 0.5 and np.median(after) < 0.2 * np.median(before), (np.median(after), np.median(before))
