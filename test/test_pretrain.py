"""Pre-training runs end to end on tiny generated scenes and writes loadable, resumable models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aceg_model.model import AcegModel, ModelConfig
from aceg_model.pretrain import PretrainConfig, pretrain
from aceg_model.pretrain_data import SceneViews, load_views, render_bank, save_views, zoomed_and_rolled
from aceg_model.pretrain_regressor import cache_scene, train
from aceg_model.regressor import RegressorConfig
from aceg_model.scene.correspondences import correspondences, project

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


def test_continued_pretraining_starts_from_a_model_file_and_can_train_the_encoder_alone(
        bank: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    start = AcegModel(TINY)
    start.save(tmp_path / "start.safetensors")
    # The configuration comes from the file, not from cfg.model; with the 3D and reprojection
    # weights at 0 only the correspondence loss trains, and it reaches the encoder alone. Every
    # pair's second view is zoomed and rolled here.
    cfg = PretrainConfig(steps=2, scenes_in_pool=2, scenes_per_step=2, patches_per_view=32, nce_points=128,
                         render_height=64, log_every=1, bank=str(bank), init=str(tmp_path / "start.safetensors"),
                         w_coords=0.0, w_reproj=0.0, lr=1e-3, warp_prob=1.0)
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


def test_pretrain_refuses_bad_loss_weights() -> None:
    with pytest.raises(ValueError, match="loss weights"):
        PretrainConfig(w_coords=0.0, w_reproj=0.0, w_nce=0.0)
    with pytest.raises(ValueError, match="loss weights"):
        PretrainConfig(w_nce=-1.0)
    with pytest.raises(ValueError, match="warp_prob"):
        PretrainConfig(warp_prob=1.5)
    with pytest.raises(ValueError, match="zoom_max"):
        PretrainConfig(zoom_max=0.5)


def test_pretrain_cli_refuses_a_missing_init_file_and_bad_weights(tmp_path: Path, capsys) -> None:
    from aceg_model.pretrain import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--init", str(tmp_path / "missing.safetensors")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--w-coords", "0", "--w-reproj", "0", "--w-nce", "0"])
    assert e.value.code == 2 and "loss weights" in capsys.readouterr().err
    assert not (tmp_path / "model.safetensors").exists()
