"""benchmarks/tuning_scenes.py without an evaluation: its real-scene splits, the 7-Scenes refusal, the table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, shared_dataset

sys.path.insert(0, str(REPO / "benchmarks"))
import tuning_scenes  # noqa: E402  (a script folder, not a package)


@pytest.mark.parametrize("folder, images", [("kitti-odometry-snippets/seq06_frames000-050", "image_l/*.png"),
                                            ("strecha-mvs-gt/Herz-Jesus-P25", "images/*.jpg")])
def test_even_odd_splits_alternate_and_cover_the_folder(folder: str, images: str) -> None:
    data = shared_dataset(folder)
    even, odd = (tuning_scenes.open_split(data, parity).names for parity in ("even", "odd"))
    assert not set(even) & set(odd)
    assert sorted(even + odd) == sorted(p.stem for p in data.glob(images))
    # Frame numbers 0, 2, 4, ... map and 1, 3, 5, ... query (and back): neighbours of every query are mapped.
    assert [int(n) for n in even] == list(range(0, len(even) + len(odd), 2))
    assert [int(n) for n in odd] == list(range(1, len(even) + len(odd), 2))


def test_every_real_job_reads_its_splits_from_the_shared_folder() -> None:
    real = [job for job in tuning_scenes.jobs() if job.mapping in tuning_scenes.PARITIES]
    assert {(job.scene, job.mapping, *job.queries) for job in real} == {
        ("kitti06", "even", "odd"), ("kitti06", "odd", "even"),
        ("herzjesu", "even", "odd"), ("herzjesu", "odd", "even")}


@pytest.mark.parametrize("path", ["../shared/data/7scenes-redkitchen-1000", "/data/7Scenes/chess"])
def test_7scenes_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="held out"):
        tuning_scenes.open_split(Path(path), "mapping")


def test_7scenes_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--json", str(tmp_path / "out.json"), "--shared-data", str(tmp_path / "7scenes"), "--only", "kitti06/odd"]
    assert tuning_scenes.main(args) == 2
    assert "held out" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def _result(**query_sets: dict) -> dict:
    return {"benchmark": "tuning_scenes", "query_sets": query_sets}


def test_table_has_a_row_per_query_set_and_a_column_per_file(tmp_path: Path) -> None:
    entry = {"n": 12, "pct5": 41.7, "pct10": 50.0, "pct2": 8.3, "no_pose": 1, "median_cm": 9.85}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result(**{"herzjesu/odd": entry, "kitti06/odd": {**entry, "median_cm": None}})))
    b.write_text(json.dumps(_result(**{"herzjesu/odd": {**entry, "pct5": 50.0, "no_pose": 0}})))
    lines = tuning_scenes.table([a, b]).splitlines()
    header = next(line for line in lines if line.startswith("| query set"))
    assert str(a) in header and str(b) in header
    herz = next(line for line in lines if line.startswith("| herzjesu/odd"))
    assert "| 41.7 / 50 %, 9.85 cm, 1 | 50 / 50 %, 9.85 cm, 0 |" in herz
    kitti = next(line for line in lines if line.startswith("| kitti06/odd"))
    assert kitti.endswith("| 41.7 / 50 %, -, 1 | - |")
    # Rows follow the benchmark's order (KITTI before Herz-Jesu), whatever the files' order.
    assert lines.index(kitti) < lines.index(herz)
    # A map of another seed (--seeds) follows its query set's row.
    c = tmp_path / "c.json"
    c.write_text(json.dumps(_result(**{"kitti06/odd": entry, tuning_scenes.result_name("kitti06", "odd", 1): entry,
                                       "herzjesu/odd": entry})))
    rows = [line.split(" |")[0] for line in tuning_scenes.table([c]).splitlines() if line.startswith("| ")][1:]
    assert rows == ["| kitti06/odd", "| kitti06/odd@seed1", "| herzjesu/odd"]


def test_table_pools_the_two_halves_of_a_real_sequence(tmp_path: Path) -> None:
    # Odd frames: 2, 4 and 30 cm off; even frames: 6 cm and no pose.
    odd = {**tuning_scenes.summarize([[2.0, 0.1], [4.0, 0.2], [30.0, 1.0]]), "errs": [[2.0, 0.1], [4.0, 0.2], [30.0, 1.0]]}
    even = {**tuning_scenes.summarize([[6.0, 0.3], None]), "errs": [[6.0, 0.3], None]}
    pooled = tuning_scenes.both_halves({"kitti06/odd": odd, "kitti06/even": even, "herzjesu/odd": odd,
                                        "kitti06/odd@seed1": odd})
    assert list(pooled) == ["kitti06/both"]  # Herz-Jesus and seed 1 lack their even half
    both = pooled["kitti06/both"]
    assert both["n"] == 5 and both["no_pose"] == 1 and both["pct5"] == 40.0 and both["pct10"] == 60.0
    assert both["median_cm"] == 5.0
    c = tmp_path / "c.json"
    c.write_text(json.dumps(_result(**{"kitti06/odd": odd, "kitti06/even": even, "herzjesu/odd": odd})))
    rows = [line.split(" |")[0] for line in tuning_scenes.table([c]).splitlines() if line.startswith("| ")][1:]
    assert rows == ["| kitti06/odd", "| kitti06/even", "| kitti06/both", "| herzjesu/odd"]


def test_seeds_must_be_distinct_and_not_negative(tmp_path: Path) -> None:
    for seeds in (["0", "0"], ["-1"]):
        with pytest.raises(SystemExit):
            tuning_scenes.main(["--json", str(tmp_path / "out.json"), "--seeds", *seeds])


def test_sweep_settings_out_of_range_are_refused(tmp_path: Path) -> None:
    for flag, value in (("--sweep-min-baseline", "-0.1"), ("--sweep-wide", "-1"), ("--sweep-wide", "17"),
                        ("--ncc-wide", "-2")):
        with pytest.raises(SystemExit):
            tuning_scenes.main(["--json", str(tmp_path / "out.json"), flag, value])


def test_results_mapped_with_another_sweep_setting_are_not_added_to(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    model = tuning_scenes.load_model(tuning_scenes.DEFAULT_MODEL, tuning_scenes.pick_device("cpu"))
    old = {"args": {"sweep_min_baseline": 0.05, "sweep_wide": 8}, "query_sets": {},
           "model": {"hash": tuning_scenes.model_info(model, tuning_scenes.DEFAULT_MODEL)["hash"], "path": "m"}}
    out = tmp_path / "out.json"
    out.write_text(json.dumps(old))
    args = ["--json", str(out), "--only", "kitti06/odd", "--device", "cpu"]
    # The file has no record of --ncc-wide: it was mapped before the option, with the sweep's views (None).
    for flag, value, said in (("--sweep-min-baseline", "0.15", "--sweep-min-baseline 0.05"),
                              ("--sweep-wide", "0", "--sweep-wide 8"), ("--ncc-wide", "0", "--ncc-wide None")):
        assert tuning_scenes.main([*args, flag, value]) == 2
        assert said in capsys.readouterr().err
        assert json.loads(out.read_text()) == old  # untouched


def test_table_refuses_other_json(tmp_path: Path) -> None:
    other = tmp_path / "bench.json"
    other.write_text(json.dumps({"benchmark": "bench_localize"}))
    with pytest.raises(ValueError, match="query_sets"):
        tuning_scenes.table([other])


def test_generated_block_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate() on a tiny stand-in for blk900011: blocks alternate mapping / query, the folder appears whole."""
    from aceg_model.scene import SceneConfig

    tiny = SceneConfig(kind="room", style="handheld", width=160, height=120, focal_range_px=(125.0, 150.0),
                       mapping_frames=6, use_shared_data=False, queries={})
    monkeypatch.setitem(tuning_scenes.GENERATED, "blk1", (1, tiny))
    monkeypatch.setattr(tuning_scenes, "BLOCK", 2)
    tuning_scenes.generate("blk1", tmp_path / "blk1")
    mapping, query = (tuning_scenes.open_split(tmp_path / "blk1", s).names for s in ("mapping", "query"))
    assert [int(n.split("-")[1]) for n in mapping] == [0, 1, 4, 5]
    assert [int(n.split("-")[1]) for n in query] == [2, 3]
    assert not (tmp_path / "blk1.partial").exists()


def test_jittered_poses_move_each_frame_by_the_stated_noise_and_leave_images_alone() -> None:
    from scipy.spatial.transform import Rotation

    frames = tuning_scenes.open_split(shared_dataset("kitti-odometry-snippets/seq06_frames000-050"), "even")
    jittered = tuning_scenes.JitteredPoses(frames, sigma_mm=3.0, sigma_deg=0.1, seed=1)
    assert len(jittered) == len(frames) and jittered.names == frames.names
    moves_mm, turns_deg = [], []
    for i in range(len(frames)):
        given, moved = frames[i], jittered[i]
        assert (moved.image == given.image).all()
        np.testing.assert_allclose(jittered.pose(i), moved.T_world_cam)  # pose() without the image agrees
        delta = np.linalg.inv(given.T_world_cam) @ moved.T_world_cam  # in the camera frame
        moves_mm.append(1e3 * delta[:3, 3])
        turns_deg.append(np.rad2deg(Rotation.from_matrix(delta[:3, :3]).as_rotvec()))
    # Per axis RMS near the sigmas (26 frames x 3 axes), and no frame left as given.
    assert 2.2 < np.sqrt(np.mean(np.square(moves_mm))) < 3.8
    assert 0.07 < np.sqrt(np.mean(np.square(turns_deg))) < 0.13
    assert np.linalg.norm(moves_mm, axis=1).min() > 0
    # The same noise on every read.
    np.testing.assert_array_equal(jittered.pose(3), tuning_scenes.JitteredPoses(frames, 3.0, 0.1, seed=1).pose(3))


@pytest.mark.parametrize("true_poses, jittered_poses", [("room900001", "jitter900001"), ("blk900011", "jitter900011")])
def test_a_jittered_scene_maps_its_scene_and_keeps_its_queries(true_poses: str, jittered_poses: str) -> None:
    by_scene = {job.scene: job for job in tuning_scenes.jobs(Path("scenes"))}
    room, jittered = by_scene[true_poses], by_scene[jittered_poses]
    assert jittered.data == room.data and jittered.queries == room.queries and jittered.mapping == room.mapping
    assert room.pose_jitter is None and jittered.pose_jitter == (3.0, 0.1)
