"""The demo's whole path with tiny settings: generated scene -> bags -> node -> map_scene over DDS ->
replay over DDS -> table, reports and plots.

A tiny random network stands in for the shipped checkpoint, so the accuracy is
meaningless: this checks that every step runs and writes what the README
promises, and that a missing model stops the demo with a clear message.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("rclpy")
from aceg_ros import demo  # noqa: E402
from test_replay import tiny_model  # noqa: E402

pytestmark = pytest.mark.ros


def test_demo_end_to_end_with_tiny_settings(tmp_path, capsys) -> None:
    model = tmp_path / "tiny.safetensors"
    tiny_model().save(model)
    out = tmp_path / "demo"
    args = ["--model", str(model), "--out", str(out), "--size", "128x96", "--mapping-frames", "6",
            "--query-frames", "2", "--iterations", "2", "--batch-patches", "128", "--quiet"]
    assert demo.main(args) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "step 3/4: mapping over DDS" in captured.err and "map_scene: mapped 6 frames" in captured.err
    assert "not the shipped model" in captured.err
    # The table: a row per query condition, with the accuracy and latency columns.
    for word in ("condition", "5cm/5°", "10cm/10°", "no pose", "p50 ms", "lighting ", "viewpoint ",
                 "total wall time"):
        assert word in captured.out, word
    for condition in ("lighting", "viewpoint"):
        rep = json.loads((out / condition / "replay.json").read_text())
        assert rep["mode"] == "dds" and rep["n_frames"] == 2 and len(rep["frames"]) == 2
        assert rep["has_ground_truth"] and rep["gt_source"].startswith("/camera/pose")
        assert (out / condition / "report.md").is_file()
        for plot in ("trajectory.png", "error_over_time.png", "error_cdf.png"):
            assert (out / condition / plot).is_file() and str(out / condition / plot) in captured.out, plot
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["conditions"]) == {"lighting", "viewpoint"} and (out / "conditions_cdf.png").is_file()
    assert (out / "map.safetensors").is_file()

    # A second run reuses the bags.
    assert demo.main(args) == 0
    assert "reusing the bags" in capsys.readouterr().err


def test_demo_without_the_model_says_what_is_missing(tmp_path, capsys) -> None:
    code = demo.main(["--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.safetensors is missing" in err and "aceg-pretrain" in err
    assert "Traceback" not in err and not (tmp_path / "demo" / "bags").exists()
