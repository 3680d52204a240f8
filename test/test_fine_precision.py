"""benchmarks/fine_precision.py: its measurement of the pixel refinement on exactly matched views."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fine_precision  # noqa: E402  (a script folder, not a package)

from aceg_model.model import AcegModel  # noqa: E402
from aceg_model.pretrain_data import SceneViews, zoomed_and_rolled  # noqa: E402


@pytest.fixture(scope="module")
def view_and_model():
    scene = SceneViews.generate(11, 240, mapping_frames=2, query_frames=1)
    return scene.mapping[0], AcegModel.load(REPO / "models" / "aceg_small.safetensors").eval()


def test_a_view_against_itself_is_refined_onto_the_true_pixels(view_and_model) -> None:
    view, model = view_and_model
    start, refined = fine_precision.pair_errors(model, view, view, np.random.default_rng(0))
    assert len(refined) > 150
    assert 2.0 < np.median(start) < 4.5  # up to 4 px off on each axis
    assert np.median(refined) < 0.5


def test_the_shipped_encoder_refines_a_zoomed_and_rolled_view_towards_the_true_pixels(view_and_model) -> None:
    view, model = view_and_model
    start, refined = fine_precision.pair_errors(model, view, zoomed_and_rolled(view, 1.2, 12.0),
                                                np.random.default_rng(0))
    assert np.median(refined) < 0.7 * np.median(start)
    summary = fine_precision.summary(start, refined)
    assert summary["matches"] == len(refined) and summary["pct_within_0.5px"] <= summary["pct_within_2px"]


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        fine_precision.parse_args(["--pairs", "0"])
    assert "--pairs must be >= 1" in capsys.readouterr().err
