"""Shared fixtures, and a guard so a run where nothing passed is never green."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ACEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is missing (CI has ../shared beside the clone)")
    return path


def small_room(seed: int, mapping_frames: int, relit_queries: int = 0, light_gain: float = 0.7):
    """A generated 320x240 handheld room (no shared data), with ``relit_queries`` queries under
    dimmer, warmer light: the scene most model tests run on."""
    from aceg_model.scene import QuerySpec, SceneConfig, generate_scene

    queries = ({"lighting": QuerySpec(n_frames=relit_queries, light_gain=light_gain, light_tint=(1.1, 1.0, 0.85))}
               if relit_queries else {})
    cfg = SceneConfig(kind="room", style="handheld", width=320, height=240, focal_range_px=(250.0, 300.0),
                      mapping_frames=mapping_frames, use_shared_data=False, queries=queries)
    return generate_scene(seed, cfg)


def quick_mapping_config(**overrides):
    """Mapping settings for tests of what happens around the landmarks (lens, mount, files): no
    NCC sharpening of the sweep's depths, no consistency probes and no pose refinement (rendered
    poses are exact: it would keep them, after 10-20 s of matching), and a plane sweep against 8
    neighbouring views instead of 16: a quarter of a small room's mapping time at the shipped
    settings. (Measured on the lens and mount tests' rooms: the sweep 26 -> 10 s and 14 -> 8 s, the
    relit queries' median error 0.34 -> 0.34 cm and 0.22 -> 0.19 cm. The sweep at the working
    resolution instead leaves the queries 1-3 cm off.) Tests of the landmarks themselves map with
    the defaults."""
    from aceg_model.landmarks import SweepConfig
    from aceg_model.map_consistency import ConsistencyConfig
    from aceg_model.mapping import MappingConfig
    from aceg_model.photo_depth import PhotoDepthConfig
    from aceg_model.pose_refinement import PoseRefinementConfig

    settings = dict(iterations=150, batch_patches=2048, sweep=SweepConfig(n_neighbours=8),
                    photo_depth=PhotoDepthConfig(enabled=False), consistency=ConsistencyConfig(enabled=False),
                    pose_refinement=PoseRefinementConfig(enabled=False))
    return MappingConfig(**{**settings, **overrides})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # pytest already fails on "no tests collected" (exit 5); also fail a run in
    # which tests were collected but none passed (all skipped or deselected).
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line("FAILED: no test passed; an empty run is not green", red=True)


def first_logged_steps(bank: Path, tmp_path: Path, model_config, runs: dict[str, dict]) -> dict[str, dict]:
    """The first logged step of one-step encoder-only pre-trainings on ``bank`` (InfoNCE weight
    0.5), each from the same fresh model of ``model_config``, one per entry of ``runs``: a name
    and its ``PretrainConfig`` settings beside the common ones."""
    import json

    import torch

    from aceg_model.model import AcegModel
    from aceg_model.pretrain import PretrainConfig, pretrain

    torch.manual_seed(4)
    AcegModel(model_config).save(tmp_path / "start.safetensors")
    common = dict(steps=1, scenes_in_pool=2, scenes_per_step=2, patches_per_view=32, nce_points=64,
                  render_height=64, log_every=1, bank=str(bank), init=str(tmp_path / "start.safetensors"),
                  w_coords=0.0, w_reproj=0.0, w_nce=0.5, lr=1e-3)
    logs = {}
    for name, settings in runs.items():
        pretrain(PretrainConfig(**{**common, **settings}), tmp_path / name, resume=False)
        logs[name] = json.loads((tmp_path / name / "pretrain_log.jsonl").read_text().splitlines()[0])
    return logs


def loss_before_and_after(loss, params, steps: int, lr: float = 1e-3) -> tuple[float, float]:
    """``loss()`` before and after ``steps`` Adam steps on ``params``; it must be finite each time."""
    import torch

    def value():
        out = loss()
        assert out is not None and torch.isfinite(out)
        return out

    opt = torch.optim.Adam(params, lr=lr)
    start = value().item()
    for _ in range(steps):
        opt.zero_grad()
        value().backward()
        opt.step()
    return start, value().item()
