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


def test_the_sharp_photo_set_shows_the_photo_at_a_640x480_cameras_sharpness(tmp_path) -> None:
    """``photo480sharp`` takes its views from the photo at 1024 px, so they carry more detail than
    ``photo480``'s magnified views: steeper grey-level edges (measured after a blur of 1 px, which
    takes out the photometric change's noise; 1.19x on these six pairs)."""
    import cv2

    from aceg_model.pretrain_data import save_views

    if not fine_precision.HERZ_JESUS.is_dir():
        pytest.skip("needs ../shared/data (Strecha Herz-Jesus-P25)")
    save_views(SceneViews.generate(11, 240, mapping_frames=2, query_frames=1), tmp_path / "scene-0000011.npz")

    def detail(name: str) -> float:
        pairs = fine_precision.draw_pairs(name, tmp_path, 6)
        assert all(v.image.shape[:2] == (480, 640) for pair in pairs for v in pair)
        # The first view of each pair has only the mild photometric change.
        grey = [cv2.GaussianBlur(cv2.cvtColor(a.image, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)
                for a, _ in pairs]
        return float(np.mean([np.abs(cv2.Sobel(g, cv2.CV_32F, 1, 0)).mean() for g in grey]))

    assert detail("photo480sharp") > 1.1 * detail("photo480")


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        fine_precision.parse_args(["--pairs", "0"])
    assert "--pairs must be >= 1" in capsys.readouterr().err
