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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # pytest already fails on "no tests collected" (exit 5); also fail a run in
    # which tests were collected but none passed (all skipped or deselected).
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line("FAILED: no test passed; an empty run is not green", red=True)
