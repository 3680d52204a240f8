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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # pytest already fails on "no tests collected" (exit 5); also fail a run in
    # which tests were collected but none passed (all skipped or deselected).
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line("FAILED: no test passed; an empty run is not green", red=True)
