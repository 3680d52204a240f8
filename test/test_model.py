"""The ACE-G network pieces, losses, mapping and map files (no trained model needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aceg_model import Frame, Intrinsics
from aceg_model.encoder import Encoder, patch_centres
from aceg_model.geometry import invert, make_pose
from aceg_model.losses import ReprojectionLossConfig, reprojection_nll
from aceg_model.mapping import FineKeys, MappingConfig, SceneMap, cache_features, map_scene, refined_pixels
from aceg_model.model import AcegModel, ModelConfig, prepare_image, working_size
from aceg_model.heads import CodesHead
from aceg_model.regressor import RegressorConfig, TokenBlock, top_k_indices


@pytest.fixture(scope="module")
def model() -> AcegModel:
    torch.manual_seed(0)
    return AcegModel(ModelConfig(regressor=RegressorConfig(n_codes=64, n_layers=2))).eval()


def test_patches_are_independent(model: AcegModel) -> None:
    # A patch's prediction must not depend on which other patches share the batch.
    feats = torch.randn(1, 50, model.config.regressor.feat_dim)
    codes = model.regressor.init_codes(1)
    with torch.no_grad():
        full, _ = model.regressor(feats, codes)
        part, _ = model.regressor(feats[:, 10:20], codes)
    assert torch.allclose(full[0, 10:20], part[0], atol=1e-5)


def test_codes_change_the_prediction(model: AcegModel) -> None:
    feats = torch.randn(1, 20, model.config.regressor.feat_dim)
    with torch.no_grad():
        a, _ = model.regressor(feats, model.regressor.init_codes(1, torch.Generator().manual_seed(1)))
        b, _ = model.regressor(feats, model.regressor.init_codes(1, torch.Generator().manual_seed(2)))
    assert (a - b).abs().mean() > 1e-3


@pytest.mark.parametrize("n_columns", [24576, 1000, 640])  # grouped, not divisible, too few groups
def test_two_stage_top_k_finds_the_same_landmarks_as_topk(n_columns: int) -> None:
    scores = torch.randn(2, 300, n_columns, generator=torch.Generator().manual_seed(n_columns))
    scores[0, :5] += 4.0 * (torch.arange(n_columns) % 7 == 0)  # rows whose best columns crowd into groups
    expected = scores.topk(16, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(top_k_indices(scores, 16).sort(dim=-1).values, expected)


@pytest.mark.parametrize("n_codes, top_k", [(512, 8), (8, 16), (64, 0)])  # top-k, and dense attention twice
def test_cached_landmark_index_matches_the_codes_and_follows_their_changes(n_codes: int, top_k: int) -> None:
    regressor = AcegModel(ModelConfig(regressor=RegressorConfig(n_codes=n_codes, attention_top_k=top_k))).eval().regressor
    head = CodesHead(regressor, regressor.init_codes(1, torch.Generator().manual_seed(3))[0])
    feats = torch.randn(40, regressor.config.feat_dim)
    with torch.no_grad():
        direct, _ = regressor(feats.unsqueeze(0), head.codes.unsqueeze(0))
        cached, _ = head(feats)  # no gradients: through the cached index
        assert torch.allclose(cached, direct[0], atol=1e-5)
        head.positions.add_(1.0)  # as an optimizer step or a map load would
        moved, _ = head(feats)
    assert torch.allclose(moved, cached + 1.0, atol=1e-4)


def test_cached_candidates_give_the_searched_attention_and_its_gradients() -> None:
    # Mapping keeps each patch's top-k landmarks between refreshes instead of searching every
    # iteration: with fresh candidates the coordinates and the gradients must be the same.
    regressor = AcegModel(ModelConfig(regressor=RegressorConfig(n_codes=512, attention_top_k=8))).eval().regressor
    head = CodesHead(regressor, regressor.init_codes(1, torch.Generator().manual_seed(4))[0]).train()
    feats = torch.randn(60, regressor.config.feat_dim)
    candidates = head.candidates(feats)
    assert candidates.shape == (60, 8) and int(candidates.max()) < 512
    results = []
    for cand in (None, candidates):
        head.zero_grad()
        coords, log_sigma = head(feats, cand)
        (coords.square().sum() + log_sigma.sum()).backward()
        results.append((coords.detach(), head.keys.grad.clone(), head.positions.grad.clone()))
    for searched, cached in zip(*results):
        assert torch.allclose(searched, cached, atol=1e-6)
    # Only the candidates' positions get gradients.
    touched = results[1][2].abs().sum(dim=1) > 0
    assert set(torch.nonzero(touched).flatten().tolist()) <= set(candidates.flatten().tolist())


def test_mapping_with_refreshed_candidates_matches_searching_every_iteration(model: AcegModel) -> None:
    frames = synthetic_frames(3)
    # Pixel refinement runs at the refreshes only (none with 0), so it is off for the comparison.
    maps = [map_scene(model, frames, MappingConfig(iterations=6, batch_patches=256, candidate_refresh=r,
                                                   refine_pixels=False))[0]
            for r in (0, 1)]
    a, b = (m.head.scene_tensors() for m in maps)
    assert torch.allclose(a["positions"], b["positions"], atol=1e-6)
    with pytest.raises(ValueError, match="candidate_refresh"):
        MappingConfig(candidate_refresh=-1)


def test_codes_made_under_inference_mode_still_regress_and_follow_changes() -> None:
    # A map loaded inside torch.inference_mode holds inference tensors, which keep no version
    # counter: the caches must not be keyed on them (this raised before).
    regressor = AcegModel(ModelConfig(regressor=RegressorConfig(n_codes=512, attention_top_k=8))).eval().regressor
    feats = torch.randn(40, regressor.config.feat_dim)
    with torch.inference_mode():
        head = CodesHead(regressor, regressor.init_codes(1, torch.Generator().manual_seed(3))[0])
        first, _ = head(feats)
        head.positions.add_(1.0)
        moved, _ = head(feats)
    assert torch.allclose(moved, first + 1.0, atol=1e-4)


def test_silent_token_block_is_skipped_only_when_it_is_not_being_trained() -> None:
    torch.manual_seed(0)
    block, x = TokenBlock(16), torch.randn(5, 16)
    with torch.no_grad():
        assert not torch.allclose(block(x), x)  # an ordinary block works
        block.mlp[-1].weight.zero_()
        block.mlp[-1].bias.zero_()
        assert block(x) is x  # silent: skipped, not computed
    # Trained from zero (pre-training's stage 2): it runs, so the output layer gets its gradient.
    block(x).sum().backward()
    assert block.mlp[-1].weight.grad is not None and block.mlp[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        block.mlp[-1].bias.fill_(0.5)  # no longer silent: noticed through the parameter's version
        assert torch.allclose(block(x), x + 0.5)


def test_encoder_is_invariant_to_global_gain() -> None:
    enc = Encoder().eval()
    image = torch.rand(1, 1, 64, 80)
    with torch.no_grad():
        assert torch.allclose(enc(image), enc(image * 0.3), atol=1e-3)


def test_patch_centres_follow_the_pixel_centre_convention() -> None:
    c = patch_centres(2, 3)
    assert c.shape == (6, 2)
    assert c[0].tolist() == [3.5, 3.5] and c[4].tolist() == [11.5, 11.5]


def test_prepare_image_scales_intrinsics_consistently() -> None:
    K = Intrinsics(525.0, 520.0, 319.5, 239.5, 640, 480)
    img, K2 = prepare_image(np.zeros((480, 640, 3), np.uint8), K, 240)
    assert img.shape == (1, 240, 320) and working_size(640, 480, 240) == (320, 240)
    # A 3D point projects to the same relative position in both images.
    X = np.array([0.3, -0.2, 2.0])
    uv = K.K @ X / X[2]
    uv2 = K2.K @ X / X[2]
    assert np.allclose((uv2[:2] + 0.5) * 2 - 0.5, uv[:2], atol=1e-9)


def test_reprojection_loss_is_lowest_at_the_true_point_and_pulls_points_in_front() -> None:
    cfg = ReprojectionLossConfig()
    K = torch.tensor([[500.0, 0, 160], [0, 500.0, 120], [0, 0, 1]]).expand(4, 3, 3)
    T = torch.eye(4).expand(4, 4, 4)
    pix = torch.tensor([[100.0, 80], [200, 150], [160, 120], [10, 10]])
    depth = torch.tensor([1.0, 2.0, 3.0, 1.5])
    true = torch.cat([(pix - torch.tensor([160.0, 120])) / 500 * depth[:, None], depth[:, None]], 1)
    log_sigma = torch.full((4,), -3.0)
    exact, stats = reprojection_nll(true, log_sigma, pix, T, K, 1.0, cfg)
    off, _ = reprojection_nll(true + torch.tensor([0.05, 0, 0]), log_sigma, pix, T, K, 1.0, cfg)
    assert stats["valid"] == 1.0 and stats["median_px"] < 1e-3 and exact < off
    # A point behind the camera is invalid and its gradient moves it forward (+z).
    behind = torch.tensor([[0.0, 0.0, -1.0]], requires_grad=True)
    loss, stats = reprojection_nll(behind, log_sigma[:1], pix[2:3], T[:1], K[:1], 0.0, cfg)
    loss.backward()
    assert stats["valid"] == 0.0 and behind.grad[0, 2] < 0


def synthetic_frames(n: int, seed: int = 0) -> list[Frame]:
    """Random textures seen by cameras on a small arc (enough to exercise mapping, not to localize)."""
    rng = np.random.default_rng(seed)
    K = Intrinsics.centred(120.0, 160, 120)
    frames = []
    for i in range(n):
        a = 0.2 * i
        R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        frames.append(Frame(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), K,
                            make_pose(R, [0.3 * i, 0.0, 5.0]), i / 30.0))
    return frames


def median_reprojection_px(model: AcegModel, scene_map: SceneMap, frames: list[Frame]) -> float:
    """Median reprojection error (working-resolution px) of a map's predictions over all patches."""
    cache = cache_features(model, frames, scene_map.centre_3)
    with torch.no_grad():
        coords_N3, _ = scene_map.head(cache.feats_NF.float())
        T = cache.T_cam_map_I44[cache.image_idx_N]
        p_N3 = torch.einsum("nij,nj->ni", T[:, :3, :3], coords_N3) + T[:, :3, 3]
        uv = torch.einsum("nij,nj->ni", cache.K_I33[cache.image_idx_N], p_N3)
        uv = uv[:, :2] / uv[:, 2:].clamp(min=1e-3)
    err = (uv - cache.pixels_N2).norm(dim=1)
    err[p_N3[:, 2] <= 0] = float("inf")
    return err.median().item()


@pytest.mark.parametrize("method", ["aceg", "ace"])
def test_mapping_brings_points_in_front_and_fits(model: AcegModel, method: str) -> None:
    frames = synthetic_frames(4)
    first, rep_first = map_scene(model, frames, MappingConfig(method=method, iterations=1, batch_patches=512))
    fitted, rep = map_scene(model, frames, MappingConfig(method=method, iterations=80, batch_patches=1024))
    # ACE: random initial predictions are mostly invalid (behind the camera or far off) and
    # the pull towards the pixel rays makes them valid. ACE-G seeds its landmarks on those
    # rays, so it starts valid. Either way the fit then improves.
    assert rep.final_valid > 0.5
    if method == "ace":
        assert rep_first.final_valid < 0.5
    assert median_reprojection_px(model, fitted, frames) < median_reprojection_px(model, first, frames)
    assert fitted.method == method


def test_mapping_refuses_too_few_frames(model: AcegModel) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        map_scene(model, synthetic_frames(2), MappingConfig(iterations=1))


def test_map_file_round_trips_and_refuses_another_model(model: AcegModel, tmp_path) -> None:
    scene_map, _ = map_scene(model, synthetic_frames(3), MappingConfig(iterations=3, batch_patches=256))
    path = tmp_path / "scene.map.safetensors"
    scene_map.save(path)
    loaded = SceneMap.load(path, model)
    feats = torch.randn(30, model.config.regressor.feat_dim)
    with torch.no_grad():
        a, _ = scene_map.predict(feats)
        b, _ = loaded.predict(feats)
    # Mapping rounds the head to its stored precision (fp16 keys, fp32 positions), so the loaded
    # map predicts exactly what the mapped one did.
    assert torch.equal(a, b)
    assert np.array_equal(loaded.centre_3, scene_map.centre_3)
    # The landmarks' fine keys (the sweep ran at 3x) come back with their scale.
    assert scene_map.fine is not None and loaded.fine.scale == scene_map.fine.scale == 3
    assert torch.equal(loaded.fine.keys_MK, scene_map.fine.keys_MK)
    # So do the landmarks' grey windows (the sweep's depths were sharpened on the raw pixels).
    assert scene_map.windows is not None and loaded.windows.radius_px == scene_map.windows.radius_px
    assert loaded.windows.scale == scene_map.windows.scale == 2
    assert torch.equal(loaded.windows.grey_MW, scene_map.windows.grey_MW)
    assert torch.equal(loaded.windows.axes_M23, scene_map.windows.axes_M23)
    other = AcegModel(model.config)
    with pytest.raises(ValueError, match="model_hash"):
        SceneMap.load(path, other)


def test_map_file_with_bad_fine_keys_is_refused(model: AcegModel, tmp_path) -> None:
    """A map whose header announces fine keys or windows it lacks, or a fine scale or window radius
    that is not one, is refused by name; the same map without the announcements loads (maps made
    before fine keys and windows)."""
    from aceg_model.safe_files import load_tensors, save_tensors

    scene_map, _ = map_scene(model, synthetic_frames(3), MappingConfig(iterations=2, batch_patches=256))
    good = tmp_path / "good.map"
    scene_map.save(good)
    tensors, meta = load_tensors(good, kind="aceg-map")
    without = {k: v for k, v in tensors.items() if k != "fine_keys"}
    save_tensors(tmp_path / "missing.map", without, meta, kind="aceg-map")
    with pytest.raises(ValueError, match="missing \\['fine_keys'\\]"):
        SceneMap.load(tmp_path / "missing.map", model)
    save_tensors(tmp_path / "scale.map", tensors, {**meta, "fine_scale": "3"}, kind="aceg-map")
    with pytest.raises(ValueError, match="invalid fine_scale '3'"):
        SceneMap.load(tmp_path / "scale.map", model)
    no_grey = {k: v for k, v in tensors.items() if k != "window_grey"}
    save_tensors(tmp_path / "no_grey.map", no_grey, meta, kind="aceg-map")
    with pytest.raises(ValueError, match="missing \\['window_grey'\\]"):
        SceneMap.load(tmp_path / "no_grey.map", model)
    save_tensors(tmp_path / "radius.map", tensors, {**meta, "window_radius_px": 0}, kind="aceg-map")
    with pytest.raises(ValueError, match="invalid window_radius_px 0"):
        SceneMap.load(tmp_path / "radius.map", model)
    old_style = {k: v for k, v in meta.items() if k not in ("fine_scale", "window_radius_px", "window_scale")}
    oldest = {k: v for k, v in without.items() if not k.startswith("window_")}
    save_tensors(tmp_path / "old.map", oldest, old_style, kind="aceg-map")
    old = SceneMap.load(tmp_path / "old.map", model)
    assert old.fine is None and old.windows is None


def test_model_file_round_trips(model: AcegModel, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = AcegModel.load(path)
    assert loaded.model_hash() == model.model_hash()
    assert loaded.config == model.config
    T = invert(make_pose(np.eye(3), [1, 2, 3]))
    assert np.allclose(T[:3, 3], [-1, -2, -3])


def test_sweep_cosines_from_scores_match_sampled_descriptors() -> None:
    """The plane sweep's scalar shortcut equals sampling the descriptors bilinearly, then the cosine,
    everywhere on the grid including its last row and column and outside it."""
    from aceg_model.encoder import STRIDE
    from aceg_model.landmarks import interpolated_cosines, neighbour_dots

    gen = torch.Generator().manual_seed(4)
    n_images, h, w, dim = 3, 5, 7, 16
    desc = torch.randn(n_images * h * w, dim, generator=gen)
    own = torch.nn.functional.normalize(torch.randn(4, dim, generator=gen), dim=-1)
    pixels = torch.rand(4, n_images, 6, 2, generator=gen) * torch.tensor([8.0 * w + 8, 8.0 * h + 8]) - 4.0
    pixels[0, 0, 0] = torch.tensor([8.0 * w - 4.5, 8.0 * h - 4.5])  # the last patch centre exactly
    dots = neighbour_dots(desc.view(n_images, h, w, dim)).view(n_images, 5, h * w)
    cos, inside = interpolated_cosines(own, desc.view(n_images, h * w, dim), dots, (h, w), pixels)
    # Reference: sample the descriptors bilinearly on the patch grid (clamped to it), then the cosine.
    grid = (pixels - (STRIDE - 1) / 2.0) / STRIDE
    inside_ref = ((grid >= 0) & (grid <= torch.tensor([w - 1.0, h - 1.0]))).all(-1)
    gx, gy = grid[..., 0].clamp(0, w - 1), grid[..., 1].clamp(0, h - 1)
    x0, y0 = gx.floor().long().clamp(max=w - 2), gy.floor().long().clamp(max=h - 2)
    fx, fy = (gx - x0).unsqueeze(-1), (gy - y0).unsqueeze(-1)

    def at(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return desc.view(n_images, h, w, dim)[torch.arange(n_images).view(1, n_images, 1), y, x]

    sampled = ((1 - fx) * (1 - fy) * at(x0, y0) + fx * (1 - fy) * at(x0 + 1, y0)
               + (1 - fx) * fy * at(x0, y0 + 1) + fx * fy * at(x0 + 1, y0 + 1))
    expected = (own.view(4, 1, 1, dim) * torch.nn.functional.normalize(sampled, dim=-1)).sum(-1)
    assert torch.equal(inside, inside_ref) and inside.any() and not inside.all()
    assert torch.allclose(cos, expected, atol=1e-5)


@pytest.mark.parametrize("scale", [1, 2])
def test_plane_sweep_recovers_the_depth_of_a_slanted_plane(scale: int) -> None:
    """Four views of a textured slanted plane, the descriptors a smooth function of the surface
    point: the sweep at either scale puts seeds of the first view at the plane's depth."""
    from aceg_model.landmarks import SweepConfig, SweepViews, sweep_depths

    h, w, f = 15, 20, 100.0  # working-resolution patch grid and focal length
    gen = torch.Generator().manual_seed(5)
    freqs = torch.randn(16, 2, generator=gen) * 6.0  # rad / m on the plane
    phases = torch.rand(16, generator=gen) * 6.28
    centres = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0.2, 0.05, 0], [0.3, 0, 0]])

    def plane_hit(origin: torch.Tensor, ray: torch.Tensor) -> torch.Tensor:
        # The plane z = 2 + 0.5 x: solve origin_z + t ray_z = 2 + 0.5 (origin_x + t ray_x).
        t = (2.0 + 0.5 * origin[0] - origin[2]) / (ray[:, 2] - 0.5 * ray[:, 0])
        return origin + t[:, None] * ray

    fs, hs, ws = f * scale, h * scale, w * scale
    K = torch.tensor([[fs, 0, (79.5 + 0.5) * scale - 0.5], [0, fs, (59.5 + 0.5) * scale - 0.5], [0, 0, 1.0]])
    ys, xs = torch.meshgrid(torch.arange(hs) * 8 + 3.5, torch.arange(ws) * 8 + 3.5, indexing="ij")
    pix = torch.stack([xs.flatten(), ys.flatten()], 1)
    rays = torch.nn.functional.pad(pix, (0, 1), value=1.0) @ torch.linalg.inv(K).T
    desc = torch.stack([torch.sin(plane_hit(c, rays)[:, :2] @ freqs.T + phases) for c in centres])
    T_cam_map = torch.eye(4).repeat(4, 1, 1)
    T_cam_map[:, :3, 3] = -centres
    views = SweepViews(desc.half(), (hs, ws), K.repeat(4, 1, 1), T_cam_map, scale)
    seeds = torch.tensor([[8.0 * x + 3.5, 8.0 * y + 3.5] for x in range(4, 16, 3) for y in range(3, 12, 3)])
    depth, sharpness = sweep_depths(views, torch.zeros(len(seeds), dtype=torch.long), seeds,
                                    SweepConfig(n_neighbours=3, scale=scale))
    K1 = torch.tensor([[f, 0, 79.5], [0, f, 59.5], [0, 0, 1.0]])
    true_depth = plane_hit(centres[0], torch.nn.functional.pad(seeds, (0, 1), value=1.0) @ torch.linalg.inv(K1).T)[:, 2]
    assert torch.isfinite(depth).all() and (sharpness > 0).all()
    assert ((depth - true_depth).abs() / true_depth).median() < 0.02


def test_mapping_pixels_refine_onto_the_landmark_they_match(model: AcegModel) -> None:
    """Fine keys taken at each mapping patch's own pixel bring that patch back to its centre; the key
    of the patch to its right moves it right by a patch (8 px); the window bounds the move."""
    frames = synthetic_frames(3)
    cache = cache_features(model, frames, np.zeros(3), sweep_scale=3)
    views = cache.sweep_views
    keys = torch.nn.functional.normalize(views.sample(cache.image_idx_N, views.to_sweep_pixels(cache.pixels_N2)), dim=-1)
    fine = FineKeys(keys.half(), 3)
    own = torch.arange(len(keys))
    back = refined_pixels(cache, fine, own, window_px=6)
    assert (back - cache.pixels_N2).norm(dim=1).median().item() < 0.25
    h, w = cache.grid_hw
    col = own % w
    inner = col < w - 1  # patches with a right-hand neighbour
    right = torch.where(inner, own + 1, own)
    moved = refined_pixels(cache, fine, right, window_px=10) - cache.pixels_N2
    assert (moved[inner] - torch.tensor([8.0, 0.0])).norm(dim=1).median().item() < 0.5
    bounded = refined_pixels(cache, fine, right, window_px=4) - cache.pixels_N2
    assert bounded.abs().max().item() <= 4.0 + 1e-4
    # Only some patches (mapping refines those its next batches hold): the same pixels there,
    # the patch centres elsewhere.
    rows = torch.tensor([1, 7, len(own) // 2, len(own) - 1])
    some = refined_pixels(cache, fine, right, window_px=10, rows_R=rows)
    assert torch.equal(some[rows], refined_pixels(cache, fine, right, window_px=10)[rows])
    others = torch.ones(len(own), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(some[others], cache.pixels_N2[others])
