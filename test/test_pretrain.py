"""Pre-training runs end to end on tiny generated scenes and writes loadable, resumable models."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aceg_model.losses import local_nce
from aceg_model.model import AcegModel, ModelConfig
from aceg_model.pretrain import (PretrainConfig, ScenePool, average_gradients, cosine_lr, fine_crop, fine_crop_loss,
                                  pretrain, synced_elapsed)
from aceg_model.frames import Frame, Intrinsics
from aceg_model.pretrain_data import (SceneViews, load_views, pair_angles, render_bank, save_views,
                                     zoomed_and_rolled)
from aceg_model.pretrain_regressor import cache_scene, main as regressor_main, matching_loss, train, train_projection
from aceg_model.regressor import RegressorConfig
from aceg_model.scene.correspondences import correspondences, project
from conftest import first_logged_steps, loss_before_and_after

TINY = ModelConfig(regressor=RegressorConfig(n_codes=32, n_layers=1), image_height=64)


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bank")
    for seed in (11, 12):
        save_views(SceneViews.generate(seed, 64, mapping_frames=4, query_frames=2), out / f"scene-{seed:07d}.npz")
    return out


def test_scene_bank_round_trips(bank: Path) -> None:
    scene = load_views(sorted(bank.glob("*.npz"))[0])
    assert len(scene.mapping) == 4 and len(scene.queries) == 4  # 2 frames x 2 query conditions
    assert scene.mapping[0].image.shape == (64, 88, 3)  # 4:3, width a multiple of the stride
    assert np.isfinite(scene.centre_3).all()


def test_render_bank_notes_a_seed_without_a_camera_path_and_does_not_try_it_again(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    tried, render = [], SceneViews.generate

    def generate(seed, height, mapping_frames, query_frames):
        tried.append(seed)
        if seed == 5:
            raise RuntimeError("no collision-free path found in this room")
        return render(seed, height, mapping_frames, query_frames)

    monkeypatch.setattr(SceneViews, "generate", staticmethod(generate))
    render_bank(tmp_path, 4, 2, height=64, mapping_frames=4, query_frames=2)
    assert tried == [4, 5]
    assert (tmp_path / "scene-0000004.npz").exists() and not (tmp_path / "scene-0000005.npz").exists()
    assert "no collision-free path" in (tmp_path / "scene-0000005.skipped").read_text()
    render_bank(tmp_path, 4, 3, height=64, mapping_frames=4, query_frames=2)
    assert tried == [4, 5, 6] and len(list(tmp_path.glob("scene-*.npz"))) == 2


def test_pretrain_writes_a_loadable_model_and_resumes(bank: Path, tmp_path: Path) -> None:
    cfg = PretrainConfig(steps=2, scenes_in_pool=2, scenes_per_step=2, patches_per_view=32, nce_points=16,
                         render_height=64, log_every=1, checkpoint_every=1, bank=str(bank), model=TINY)
    path = pretrain(cfg, tmp_path, resume=False)
    model = AcegModel.load(path)
    assert model.config == TINY
    assert (tmp_path / "pretrain_log.jsonl").read_text().count("\n") == 2
    # Resuming from the state file continues at the recorded step.
    cfg.steps = 3
    pretrain(cfg, tmp_path, resume=True)
    assert (tmp_path / "pretrain_log.jsonl").read_text().count("\n") == 3


def test_stage2_trains_the_regressor_only(bank: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AcegModel(TINY)
    rng = np.random.default_rng(0)
    scenes = [cache_scene(model, load_views(f), rng) for f in sorted(bank.glob("*.npz"))]
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    reg_before = {k: v.clone() for k, v in model.regressor.state_dict().items()}
    train(model, scenes, tmp_path, minutes=0.02, scenes_per_step=2, landmarks=64, patches=32)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc_before.items())
    assert any(not torch.equal(v, model.regressor.state_dict()[k]) for k, v in reg_before.items())
    assert (tmp_path / "regressor_log.jsonl").exists()


def test_matching_loss_counts_every_landmark_near_the_true_point() -> None:
    gen = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(1, 50, 8, generator=gen), dim=-1)
    pos = torch.arange(50.0).view(1, 50, 1).repeat(1, 1, 3)  # landmarks 1.7 m apart
    # Each query is its landmark's key: the attention is all on the right one.
    assert matching_loss(keys, keys, pos, pos, 300.0, 0.05) < 1e-3
    # Queries that match other landmarks' keys miss by a lot.
    assert matching_loss(keys.roll(1, dims=1), keys, pos, pos, 300.0, 0.05) > 10
    # Two landmarks at one point with one key each, the query halfway between their keys: half
    # of the attention on each, and both count (a one-target cross-entropy would give ln 2).
    two = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), dim=-1)
    q = torch.nn.functional.normalize(torch.tensor([[[1.0, 1.0]]]), dim=-1)
    assert matching_loss(q, two, torch.zeros(1, 1, 3), torch.zeros(1, 2, 3), 300.0, 0.05) < 1e-5
    # A query without a landmark near its point is left out; with none at all, the loss is 0.
    far = torch.full((1, 1, 3), 1e3)
    assert matching_loss(q, two, far, torch.zeros(1, 2, 3), 300.0, 0.05) == 0


def test_projection_training_moves_the_query_projection_alone(bank: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AcegModel(TINY)
    rng = np.random.default_rng(0)
    scenes = [cache_scene(model, load_views(f), rng) for f in sorted(bank.glob("*.npz"))]
    model.regressor.fit_query_projection(torch.cat([cs.feats_VPF[: cs.n_mapping].flatten(0, 1) for cs in scenes]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_projection(model, scenes, scenes, tmp_path, minutes=10, max_steps=5, scenes_per_step=2,
                               landmarks=64, patches=32, lr=1e-2, radius_m=0.5)
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == {"regressor.query.weight", "regressor.query.bias"}
    assert [h["step"] for h in history] == [0, 5] and history[-1]["loss"] > 0 and history[0]["patches"] > 0
    assert (tmp_path / "projection_log.jsonl").read_text().count("\n") == 2
    for bad in (["--minutes", "0"], ["--lr", "-1"], ["--held", "-1"]):
        with pytest.raises(SystemExit):
            regressor_main(["--model", "m", "--bank", str(bank), "--out", str(tmp_path), "--match-projection", *bad])


def test_continued_pretraining_starts_from_a_model_file_and_can_train_the_encoder_alone(
        bank: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    start = AcegModel(TINY)
    start.save(tmp_path / "start.safetensors")
    # The configuration comes from the file, not from cfg.model; with the 3D and reprojection
    # weights at 0 only the correspondence loss trains, and it reaches the encoder alone. Every
    # pair's second view is zoomed and rolled here, and every pair drawn wide where the scene has one.
    cfg = PretrainConfig(steps=2, scenes_in_pool=2, scenes_per_step=2, patches_per_view=32, nce_points=128,
                         render_height=64, log_every=1, bank=str(bank), init=str(tmp_path / "start.safetensors"),
                         w_coords=0.0, w_reproj=0.0, lr=1e-3, warp_prob=1.0, wide_pair_prob=1.0)
    out = AcegModel.load(pretrain(cfg, tmp_path / "run", resume=False))
    assert out.config == TINY
    before, after = start.state_dict(), out.state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items() if k.startswith("regressor."))
    enc = [k for k in after if k.startswith("encoder.")]
    assert any(not torch.equal(before[k], after[k]) for k in enc)
    # Small steps from the start, not a fresh initialization.
    assert all((after[k].float() - before[k].float()).abs().max() < 0.05 for k in enc)
    # Resuming such a run takes the configuration from its state file, not cfg.model's default.
    cfg.steps = 3
    resumed = AcegModel.load(pretrain(cfg, tmp_path / "run", resume=True))
    assert resumed.config == TINY
    assert (tmp_path / "run" / "pretrain_log.jsonl").read_text().count("\n") == 3


@pytest.mark.parametrize("scale, roll_deg", [(1.4, 15.0), (0.75, -20.0)])
def test_a_zoomed_and_rolled_view_keeps_its_geometry_exact(bank: Path, scale: float, roll_deg: float) -> None:
    view = load_views(sorted(bank.glob("*.npz"))[0]).mapping[1]
    warped = zoomed_and_rolled(view, scale, roll_deg)
    assert warped.image.shape == view.image.shape and warped.intrinsics.fx == pytest.approx(view.intrinsics.fx * scale)
    # Every surface pixel's scene coordinate projects back onto that pixel, at its depth, in the
    # warped camera (within the nearest-pixel sampling of the warp and the bank's float16).
    coords = warped.meta["scene_coords"]
    v, u = np.nonzero(np.isfinite(coords[..., 0]))
    assert len(u) > 0.3 * coords.shape[0] * coords.shape[1]
    uv, z = project(coords[v, u].astype(np.float64), warped)
    assert np.abs(uv - np.stack([u, v], 1)).max() < 1.5
    assert np.abs(z - warped.depth[v, u]).max() < 0.02 * z.max()
    # The rendered correspondences between the original and the warped view join pixels that look alike.
    uv_a, uv_b = correspondences(view, warped, 64, np.random.default_rng(0))
    assert len(uv_a) > 20
    grey_a = view.image.mean(-1)[uv_a[:, 1].astype(int), uv_a[:, 0].astype(int)]
    b = np.round(uv_b).astype(int)
    h, w = warped.image.shape[:2]
    grey_b = warped.image.mean(-1)[b[:, 1].clip(0, h - 1), b[:, 0].clip(0, w - 1)]
    assert np.median(np.abs(grey_a - grey_b)) < 0.25 * np.median(np.abs(grey_a - np.roll(grey_b, 7)))


def test_the_local_loss_tells_a_feature_that_says_where_it_is_from_a_smooth_one() -> None:
    torch.manual_seed(0)
    n, k, d = 64, 8, 32
    a = torch.randn(n, d)
    # Features beside the match that are other features: the true one wins.
    sharp = torch.cat([a[:, None], torch.randn(n, k, d)], 1)
    # A smooth feature map: the neighbours are nearly the match itself, chance is ln(k + 1).
    smooth = a[:, None] + 1e-3 * torch.randn(n, k + 1, d)
    assert local_nce(a, sharp) < 0.05
    assert local_nce(a, smooth).item() == pytest.approx(np.log(k + 1), abs=0.01)


def test_the_local_loss_is_added_to_the_infonce_on_the_same_draws(bank: Path, tmp_path: Path) -> None:
    logs = first_logged_steps(bank, tmp_path, TINY, {"off": {"w_local": 0.0}, "on": {"w_local": 1.0}})
    # The local offsets have their own random stream: both runs drew the same views and matches,
    # so the first iteration's InfoNCE is the same, and the local term is logged beside it.
    on, off = logs["on"]["mapping"], logs["off"]["mapping"]
    assert on["nce"] == pytest.approx(off["nce"], abs=1e-6)
    assert off["local"] is None
    assert 1.0 < on["local"] < np.log(9) + 0.5  # near chance from a fresh encoder
    assert on["loss"] == pytest.approx(0.5 * (on["nce"] + on["local"]), rel=1e-5)


def test_a_crop_on_the_stride_grid_has_the_whole_images_features_away_from_its_border() -> None:
    torch.manual_seed(0)
    encoder = AcegModel(TINY).encoder.eval()
    image = torch.rand(1, 1, 192, 256)
    normalized = encoder.normalize(image)
    with torch.no_grad():
        whole = encoder.features(normalized)[0]
        crop, origin = fine_crop(normalized[0], np.array([150.0, 90.0]), 128)
        part = encoder.features(crop[None])[0]
    assert tuple(origin) == (80, 24)  # floor((150 - 64) / 8) * 8, floor((90 - 64) / 8) * 8
    # The encoder sees 111 px around a cell: cells 56 px inside the crop see none of its border.
    oy, ox = origin[1] // 8, origin[0] // 8
    assert torch.allclose(part[:, 7:9, 7:9], whole[:, oy + 7:oy + 9, ox + 7:ox + 9], atol=1e-5)
    assert not torch.allclose(part[:, 0, 0], whole[:, oy, ox], atol=1e-3)  # the border does differ
    # A crop asked for near the image's edge stays inside it.
    _, origin = fine_crop(normalized[0], np.array([250.0, 3.0]), 128)
    assert tuple(origin) == (128, 0)


def test_the_fine_term_trains_the_encoder_to_place_matches_in_a_crop(bank: Path) -> None:
    torch.manual_seed(1)
    model = AcegModel(TINY)
    cfg = PretrainConfig(model=TINY, w_coords=0.0, w_reproj=0.0, w_fine=1.0, fine_points=32)
    scene = load_views(sorted(bank.glob("*.npz"))[0])
    a = scene.mapping[0]
    b = zoomed_and_rolled(a, 1.1, 10.0)

    # The same crops and matches each time.
    start, end = loss_before_and_after(lambda: fine_crop_loss(model, a, b, cfg, np.random.default_rng(3)),
                                       model.encoder.parameters(), 25)
    # InfoNCE among up to 32 matches plus the local term among 9: a fresh encoder is near chance.
    assert start > 0.5 * (np.log(8) + np.log(9))
    assert end < 0.6 * start


def test_the_fine_term_matches_the_same_photo_points_in_views_taller_than_the_working_height(monkeypatch) -> None:
    """Views at twice the working height (fine photo pairs) go to the fine scale by their own factor:
    with the encoder replaced by the cell means of the image, the two sides of every fine match read
    the same value of a photo that is a ramp along x (and along y)."""
    import aceg_model.pretrain as pretrain_module
    from aceg_model.photo_pairs import look_at, plane_view

    model = AcegModel(TINY)
    monkeypatch.setattr(model.encoder, "normalize", lambda image: image)
    # A cell's mean over a linear ramp is the ramp at the cell's centre: bilinear sampling of the
    # cell means then reads the ramp at any pixel.
    monkeypatch.setattr(model.encoder, "features", lambda crops: torch.nn.functional.avg_pool2d(crops, 8))
    seen = []
    monkeypatch.setattr(pretrain_module, "info_nce", lambda fa, fb: seen.append((fa, fb)) or fa.sum() * 0)
    K = Intrinsics(130.0, 130.0, 83.5, 63.5, 168, 128)  # 2 x TINY's 64 px working height
    poses = [look_at(np.zeros(3), 25.0, 30.0, 0.7, 0.0), look_at(np.array([0.05, 0.0, 0.0]), 20.0, 200.0, 0.6, 15.0)]
    ramp_x = np.tile(np.linspace(0, 255, 256), (192, 1))
    cfg = PretrainConfig(model=TINY, w_coords=0.0, w_reproj=0.0, w_fine=1.0, fine_points=32, fine_crop_px=32,
                         fine_parts="nce")
    for ramp in (ramp_x, np.tile(np.linspace(0, 255, 192)[:, None], (1, 256))):
        photo = np.repeat(ramp[..., None], 3, 2).astype(np.uint8)
        a, b = (plane_view(photo, K, T) for T in poses)
        assert fine_crop_loss(model, a, b, cfg, np.random.default_rng(0)) is not None
    (xa, xb), (ya, yb) = seen
    assert len(xa) >= 8 and len(ya) == len(xa)  # the same draws on both photos
    assert float(xa.std()) > 5 / 255 and float(ya.std()) > 5 / 255  # matches spread over the crop
    assert float((xa - xb).abs().max()) < 2.5 / 255 and float((ya - yb).abs().max()) < 2.5 / 255


def test_the_fine_terms_halves_sum_to_the_whole_on_the_same_draws(bank: Path) -> None:
    torch.manual_seed(2)
    model = AcegModel(TINY)
    scene = load_views(sorted(bank.glob("*.npz"))[0])
    a = scene.mapping[0]
    b = zoomed_and_rolled(a, 1.1, 10.0)
    value = {}
    for parts in ("both", "nce", "local"):
        cfg = PretrainConfig(model=TINY, w_coords=0.0, w_reproj=0.0, w_fine=1.0, fine_points=32, fine_parts=parts)
        with torch.no_grad():
            value[parts] = fine_crop_loss(model, a, b, cfg, np.random.default_rng(3)).item()
    # Each half alone is a positive loss, and they add up to the whole: the same crops and matches.
    assert value["nce"] > 0.5 * np.log(8) and value["local"] > 0.5 * np.log(9)
    assert value["nce"] + value["local"] == pytest.approx(value["both"], rel=1e-5)
    with pytest.raises(ValueError, match="fine_parts"):
        PretrainConfig(model=TINY, w_fine=1.0, fine_parts="coarse")


def test_the_fine_term_is_added_to_the_infonce_on_the_same_draws(bank: Path, tmp_path: Path) -> None:
    logs = first_logged_steps(bank, tmp_path, TINY, {"off": {"fine_points": 32},
                                                      "on": {"fine_points": 32, "w_fine": 0.5}})
    on, off = logs["on"]["mapping"], logs["off"]["mapping"]
    # The fine term draws its crops from its own random stream: the same views and matches.
    assert on["nce"] == pytest.approx(off["nce"], abs=1e-6)
    assert off["fine"] is None and on["fine"] > 0
    assert on["loss"] == pytest.approx(0.5 * on["nce"] + 0.5 * on["fine"], rel=1e-5)


def rendered_and_photo_fine_steps(bank: Path, tmp_path: Path, photo_settings: dict) -> tuple[dict, dict]:
    """The first mapping iteration's logged losses with the fine term on rendered pairs alone, and
    with ``photo_settings`` for its photo pairs (at 128 px) on the same start."""
    from aceg_model.photo_pairs import vga_photos

    if not vga_photos():
        pytest.skip("needs ../shared/data (the Strecha photos)")
    fine = {"fine_points": 32, "w_fine": 0.5}
    logs = first_logged_steps(bank, tmp_path, TINY, {
        "rendered": fine, "photos": {**fine, **photo_settings, "fine_photo_height": 128}})
    return logs["rendered"]["mapping"], logs["photos"]["mapping"]


def test_fine_photo_pairs_replace_the_rendered_fine_pairs_on_the_same_coarse_draws(bank: Path, tmp_path: Path) -> None:
    rendered, photos = rendered_and_photo_fine_steps(bank, tmp_path, {"fine_photo_prob": 1.0})
    assert photos["nce"] == pytest.approx(rendered["nce"], abs=1e-6)  # the fine draws have their own stream
    assert photos["fine"] > 0 and photos["fine"] != pytest.approx(rendered["fine"], abs=1e-4)
    with pytest.raises(ValueError, match="fine_photo_prob"):
        PretrainConfig(fine_photo_prob=1.5)
    with pytest.raises(ValueError, match="fine_photo_height"):
        PretrainConfig(fine_photo_height=16)


def test_extra_fine_photo_pairs_add_their_own_term_beside_the_same_rendered_fine_pairs(bank: Path,
                                                                                     tmp_path: Path) -> None:
    rendered, extra = rendered_and_photo_fine_steps(bank, tmp_path, {"fine_photo_extra": 1})
    # The photo pairs are drawn after the rendered ones: those and the coarse term draw what they drew.
    assert extra["nce"] == pytest.approx(rendered["nce"], abs=1e-6)
    assert extra["fine"] == pytest.approx(rendered["fine"], abs=1e-6)
    assert rendered["fine_photo"] is None and extra["fine_photo"] > 0
    assert extra["loss"] == pytest.approx(0.5 * (extra["nce"] + extra["fine"] + extra["fine_photo"]), rel=1e-5)
    with pytest.raises(ValueError, match="fine_photo_extra"):
        PretrainConfig(fine_photo_extra=1)  # w_fine is 0


def test_pretrain_refuses_bad_loss_weights() -> None:
    with pytest.raises(ValueError, match="loss weights"):
        PretrainConfig(w_coords=0.0, w_reproj=0.0, w_nce=0.0)
    with pytest.raises(ValueError, match="loss weights"):
        PretrainConfig(w_nce=-1.0)
    with pytest.raises(ValueError, match="warp_prob"):
        PretrainConfig(warp_prob=1.5)
    with pytest.raises(ValueError, match="zoom_max"):
        PretrainConfig(zoom_max=0.5)
    with pytest.raises(ValueError, match="wide_pair_prob"):
        PretrainConfig(wide_pair_prob=-0.1)
    with pytest.raises(ValueError, match="wide_min_deg < wide_max_deg"):
        PretrainConfig(wide_min_deg=40.0, wide_max_deg=30.0)
    with pytest.raises(ValueError, match="view pairs"):
        PretrainConfig(views_per_scene=1)
    with pytest.raises(ValueError, match="w_local"):
        PretrainConfig(w_local=-1.0)
    with pytest.raises(ValueError, match="local_min_px"):
        PretrainConfig(local_min_px=8.0, local_max_px=4.0)
    with pytest.raises(ValueError, match="w_fine"):
        PretrainConfig(w_fine=-0.5)
    with pytest.raises(ValueError, match="fine_crop_px"):
        PretrainConfig(w_fine=1.0, fine_crop_px=16, fine_max_px=6.0)


def test_pretrain_cli_refuses_a_missing_init_file_and_bad_weights(tmp_path: Path, capsys) -> None:
    from aceg_model.pretrain import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--init", str(tmp_path / "missing.safetensors")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--w-coords", "0", "--w-reproj", "0", "--w-nce", "0"])
    assert e.value.code == 2 and "loss weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--wide-pair-prob", "0.5", "--wide-min-deg", "50", "--wide-max-deg", "40"])
    assert e.value.code == 2 and "wide_min_deg < wide_max_deg" in capsys.readouterr().err
    assert not (tmp_path / "model.safetensors").exists()


def plane_view(centre: tuple[float, float, float], look_at: tuple[float, float, float], name: str) -> Frame:
    """A 64x48 view of the textured plane z = 2 m from ``centre``, looking at ``look_at``, with
    exact depth and scene coordinates (NaN and depth 0 where a pixel's ray misses the plane)."""
    K = Intrinsics(50.0, 50.0, 31.5, 23.5, 64, 48)
    c = np.asarray(centre, float)
    z = np.asarray(look_at, float) - c
    z /= np.linalg.norm(z)
    y = np.array([0.0, 1.0, 0.0]) - z[1] * z
    y /= np.linalg.norm(y)
    R = np.stack([np.cross(y, z), y, z], 1)  # columns: camera x (right), y (down), z (forward)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, c
    v, u = np.mgrid[0:48, 0:64]
    rays = np.stack([(u - K.cx) / K.fx, (v - K.cy) / K.fy, np.ones_like(u, float)], -1) @ R.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (2.0 - c[2]) / rays[..., 2]  # depth along the optical axis: the rays' camera z is 1
    hit = np.isfinite(t) & (t > 0)
    coords = np.where(hit[..., None], c + t[..., None] * rays, np.nan).astype(np.float32)
    image = np.random.default_rng(len(name)).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return Frame(image, K, T, 0.0, np.where(hit, t, 0.0).astype(np.float32), name, {"scene_coords": coords})


def test_pair_angles_measure_how_far_apart_two_views_see_the_same_surface() -> None:
    # Cameras b metres to the side of the first, all looking at (0, 0, 2): at that point their
    # rays meet at atan(b / 2), and within a few degrees of it over the surface both see; the
    # last camera looks away from the plane.
    views = [plane_view((b, 0.0, 0.0), (0.0, 0.0, 2.0), f"side-{b}") for b in (0.0, 0.3, 0.8, 1.5)]
    views.append(plane_view((0.0, 0.0, 0.0), (0.0, 0.0, -2.0), "away"))
    angles = pair_angles(views, np.random.default_rng(0))
    expected = np.degrees(np.arctan(np.array([0.3, 0.8, 1.5]) / 2))
    assert angles[0, 1:4] == pytest.approx(expected, abs=3.0)
    assert angles[1:4, 0] == pytest.approx(expected, abs=3.0)
    assert angles[1, 3] == pytest.approx(expected[2] - expected[0], abs=3.0)
    assert np.isnan(np.diag(angles)).all()
    assert np.isnan(angles[4]).all() and np.isnan(angles[:, 4]).all()  # no surface in common


def test_wide_pairs_are_drawn_among_views_that_see_the_same_surfaces_from_apart() -> None:
    side = {b: plane_view((b, 0.0, 0.0), (0.0, 0.0, 2.0), f"side-{b}") for b in (0.0, 0.1, 1.2, -0.3)}
    scene = SceneViews(0, [side[0.0], side[0.1], side[1.2]], [side[-0.3]], np.zeros(3))
    rng = np.random.default_rng(0)

    def draws(query: bool, wide_prob: float, wide_deg=(20.0, 60.0)) -> set[tuple[float, float]]:
        out = set()
        for _ in range(40):
            pair = scene.view_pair(query, rng, wide_prob, wide_deg)  # relit views: known by their poses
            out.add(tuple(next(b for b, v in side.items() if np.allclose(v.T_world_cam, w.T_world_cam)) for w in pair))
        return out

    # Between mapping views (about 3, 31 and 28 degrees apart) only the third with either other
    # is 20-60 degrees apart.
    assert draws(False, 1.0) == {(0.0, 1.2), (1.2, 0.0), (0.1, 1.2), (1.2, 0.1)}
    # The query view is about 8, 11 and 40 degrees from them: only the third.
    assert draws(True, 1.0) == {(1.2, -0.3)}
    # Without wide pairs, and where the scene has none in the range, the pairs are drawn at random.
    assert len(draws(False, 0.0)) > 4
    assert len(draws(True, 1.0, (70.0, 80.0))) == 3


def test_the_learning_rate_decays_over_the_steps_or_the_time_budget_whichever_ends_first() -> None:
    assert cosine_lr(1e-3, 0, 100, 0.0, None) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 50, 100, 1e6, None) == pytest.approx(5e-4)  # no budget: steps alone
    assert cosine_lr(1e-3, 10, 100, 30.0, 60.0) == pytest.approx(5e-4)  # half the time gone
    assert cosine_lr(1e-3, 10, 100, 90.0, 60.0) == pytest.approx(0.0, abs=1e-12)  # past the budget


def test_ranks_take_bank_scenes_by_seed_and_never_one_still_being_written(bank: Path, tmp_path: Path) -> None:
    for f in bank.glob("scene-*.npz"):
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "scene-0000013.npz.tmp.npz").write_bytes(b"half a scene")
    cfg = PretrainConfig(scenes_in_pool=1, scenes_per_step=1, render_height=64, bank=str(tmp_path), model=TINY)
    regressor = AcegModel(TINY).regressor
    seeds = [[s.seed for s in ScenePool(cfg, regressor, rank, 2, torch.device("cpu")).scenes] for rank in (0, 1)]
    assert seeds == [[12], [11]]
    pool = ScenePool(cfg, regressor, 0, 1, torch.device("cpu"))
    assert pool._next_scene(wait=False).seed == 12 and pool._next_scene(wait=False) is None


def _two_rank_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    if rank == 0:  # rank 1 had no loss this iteration: its gradients are None
        a.grad, b.grad = torch.tensor([2.0, 4.0, 6.0]), torch.ones(2, 2)
    average_gradients([a, b], 2)
    elapsed = synced_elapsed(time.perf_counter() - (5.0 if rank == 1 else 1.0), 2)
    results[rank] = (a.grad.tolist(), b.grad.tolist(), elapsed)
    dist.destroy_process_group()


def test_ranks_average_their_gradients_and_agree_on_the_time(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        r0, r1 = results[0], results[1]
    assert r0[:2] == r1[:2] == ([1.0, 2.0, 3.0], [[0.5, 0.5], [0.5, 0.5]])
    assert r0[2] == r1[2] >= 5.0  # the slower rank's clock, on both


def test_pretraining_under_torchrun_with_two_ranks_writes_a_model(bank: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    torch.manual_seed(5)
    start = AcegModel(TINY)
    start.save(tmp_path / "start.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "aceg_model.pretrain", "--out", str(tmp_path / "run"), "--steps", "2",
                          "--scenes-in-pool", "1", "--scenes-per-step", "1", "--bank", str(bank),
                          "--init", str(tmp_path / "start.safetensors"), "--w-coords", "0", "--w-reproj", "0",
                          "--lr", "1e-3"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = AcegModel.load(tmp_path / "run" / "model.safetensors")
    assert out.config == TINY
    before, after = start.state_dict(), out.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("encoder."))
    from aceg_model.safe_files import read_meta

    assert read_meta(tmp_path / "run" / "model.safetensors", kind="aceg-model")["world_size"] == 2
