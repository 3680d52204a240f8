"""Dataset loaders on the real data in ../shared/data, and the posed-folder writer on synthetic frames."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import shared_dataset
from scipy.spatial.transform import Rotation

from aceg_model.datasets import (
    detect_layout,
    load_7scenes,
    load_kitti,
    load_redkitchen,
    load_strecha,
    open_dataset,
    write_posed_folder,
)
from aceg_model.frames import Frame, Intrinsics
from aceg_model.geometry import invert, make_pose, pose_error

REDKITCHEN = "7scenes-redkitchen-1000"
STAIRS = "7scenes-stairs-mini"
KITTI = "kitti-odometry-snippets"
STRECHA = "strecha-mvs-gt"
COLOUR_525 = Intrinsics(525.0, 525.0, 320.0, 240.0, 640, 480)


def parse_matrix(path: Path) -> np.ndarray:
    """Independent reader for the test: whitespace/tab separated rows of numbers."""
    rows = [[float(x) for x in line.replace("\t", " ").split()] for line in path.read_text().splitlines()]
    return np.array([r for r in rows if r])


def assert_pose_from_file(T: np.ndarray, stored: np.ndarray) -> None:
    """The stored pose, its rotation snapped to the nearest true rotation (files keep ~4 decimals)."""
    stored = np.vstack([stored, [0, 0, 0, 1]]) if stored.shape == (3, 4) else stored
    np.testing.assert_array_equal(T[:, 3], stored[:, 3])
    np.testing.assert_allclose(T[:3, :3], stored[:3, :3], atol=2e-4)
    np.testing.assert_allclose(T[:3, :3].T @ T[:3, :3], np.eye(3), atol=1e-12)


# --- 7-Scenes redkitchen -------------------------------------------------------------------


def test_redkitchen_counts_and_splits() -> None:
    root = shared_dataset(REDKITCHEN)
    everything, mapping, query = (load_redkitchen(root, s) for s in (None, "mapping", "query"))
    assert (len(everything), len(mapping), len(query)) == (1000, 500, 500)
    assert set(mapping.names).isdisjoint(query.names)
    assert sorted(mapping.names + query.names) == everything.names
    # Blocks of 100: mapping 0-99, 200-299, ...; query 100-199, ...
    assert query.names[0] == "frame-000100" and mapping.names[100] == "frame-000200"
    assert query.stamps[0] == pytest.approx(100 / 30)


def test_redkitchen_first_frame_pose_image_intrinsics_depth() -> None:
    root = shared_dataset(REDKITCHEN)
    ds = load_redkitchen(root, with_depth=True)
    frame = ds[0]
    expected = parse_matrix(root / "frames" / "frame-000000.pose.txt")
    assert_pose_from_file(frame.T_world_cam, expected)
    assert frame.T_world_cam[0, 0] == pytest.approx(0.9093129, abs=1e-4)
    assert frame.T_world_cam[0, 3] == pytest.approx(-0.34045634)
    assert ds.intrinsics == COLOUR_525 and frame.intrinsics == COLOUR_525
    assert frame.image.shape == (480, 640, 3) and frame.image.dtype == np.uint8
    assert frame.name == "frame-000000" and frame.stamp == 0.0 and ds.stamps[30] == pytest.approx(1.0)
    # Depth: float32 metres, a kitchen seen from 0.5-4 m.
    depth = frame.depth
    assert depth.dtype == np.float32 and depth.shape == (480, 640)
    valid = depth[depth > 0]
    assert valid.size > 0.5 * depth.size and 0.5 < np.median(valid) < 4.0 and valid.max() < 10.0
    # Registered from the f=585 depth camera to the f=525 colour camera: colour pixel
    # (425, 275) is 105/35 px from the centre, i.e. depth pixel (320+117, 240+39).
    raw_mm = cv2.imread(str(root / "frames" / "frame-000000.depth.png"), cv2.IMREAD_UNCHANGED)
    assert depth[275, 425] == np.float32(raw_mm[279, 437]) / np.float32(1000.0)
    assert np.all(depth[:, :30] == 0)  # the colour camera sees wider than the depth camera


def test_loaded_rotations_are_the_nearest_true_rotations() -> None:
    """7-Scenes' rotation matrices are ~1e-4 off orthonormal. Loading snaps them to the nearest
    rotation, and the rotation error between file and loaded pose reads (almost) no turn; the
    arccos of the trace made about a degree of it."""
    root = shared_dataset(REDKITCHEN)
    ds = load_redkitchen(root)
    for i in (0, 250, 999):
        raw = parse_matrix(root / "frames" / f"frame-{i:06d}.pose.txt")
        R = ds.pose(i)[:3, :3]
        assert np.abs(R.T @ R - np.eye(3)).max() < 1e-12 and np.linalg.det(R) == pytest.approx(1.0, abs=1e-12)
        assert np.abs(raw[:3, :3].T @ raw[:3, :3] - np.eye(3)).max() > 5e-5  # the file's own departure
        old_style = np.degrees(np.arccos(np.clip((np.trace(R.T @ raw[:3, :3]) - 1) / 2, -1, 1)))
        assert old_style > 0.3 and pose_error(ds.pose(i), raw)[1] < 0.02
        np.testing.assert_array_equal(ds.pose(i)[:3, 3], raw[:3, 3])
    # Small turns between true rotations read exactly.
    T = make_pose(Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix(), [1, 2, 3])
    turned = T @ make_pose(Rotation.from_rotvec([0, 0, np.radians(0.001)]).as_matrix(), [0, 0, 0])
    assert pose_error(turned, T)[1] == pytest.approx(0.001, rel=1e-6)


def test_redkitchen_intrinsics_overrides_and_list_file(tmp_path: Path) -> None:
    root = shared_dataset(REDKITCHEN)
    assert load_redkitchen(root, focal=585.0).intrinsics.fx == 585.0
    K_file = tmp_path / "K.txt"
    K_file.write_text("530 0 321.5\n0 531 239.5\n0 0 1\n")
    expected = Intrinsics(530.0, 531.0, 321.5, 239.5, 640, 480)
    assert load_redkitchen(root, intrinsics_file=K_file).intrinsics == expected
    list_file = tmp_path / "few.txt"
    list_file.write_text("frame-000007\nframe-000003\n\n")
    few = load_redkitchen(root, list_file)
    assert few.names == ["frame-000003", "frame-000007"] and few[0].depth is None
    list_file.write_text("frame-000003\nframe-123456\n")
    with pytest.raises(ValueError, match=r"few\.txt names 1 frames not in .*frame-123456"):
        load_redkitchen(root, list_file)
    with pytest.raises(ValueError, match=r"unknown split 'train'.*\['mapping', 'query'\]"):
        load_redkitchen(root, "train")


# --- 7-Scenes official layout --------------------------------------------------------------


def test_7scenes_official_layout_splits_poses_stamps() -> None:
    root = shared_dataset(STAIRS)
    train, test, everything = load_7scenes(root, "train"), load_7scenes(root, "test"), load_7scenes(root)
    assert (len(train), len(test), len(everything)) == (6, 6, 12)
    assert train.names[0] == "seq-02/frame-000000" and test.names[-1] == "seq-04/frame-000002"
    assert np.all(np.diff(everything.stamps) > 0)
    np.testing.assert_allclose(everything.stamps[:3], [0.0, 1 / 30, 2 / 30])
    # Tab-separated text with 'e-001' exponents, parsed here independently.
    pose = everything.pose(0)
    assert_pose_from_file(pose, parse_matrix(root / "seq-01" / "frame-000000.pose.txt"))
    assert pose[0, 0] == pytest.approx(0.93817085, abs=1e-4) and pose[2, 3] == pytest.approx(-0.054694783)
    frame = load_7scenes(root, "test", with_depth=True)[0]
    assert frame.image.shape == (480, 640, 3) and frame.intrinsics == COLOUR_525
    valid = frame.depth[frame.depth > 0]
    assert frame.depth.dtype == np.float32 and 0.3 < np.median(valid) < 5.0
    with pytest.raises(ValueError, match=r"unknown 7-Scenes split 'mapping'.*'train', 'test'"):
        load_7scenes(root, "mapping")


# --- KITTI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("snippet, shape, fx", [("seq06_frames000-050", (370, 1226), 707.0912),
                                                ("seq01_frames000-050", (376, 1241), 718.856)])
def test_kitti_snippet(snippet: str, shape: tuple[int, int], fx: float) -> None:
    root = shared_dataset(KITTI) / snippet
    ds = load_kitti(root)
    assert len(ds) == 51
    P0 = parse_matrix(root / "calib.txt")[0].reshape(3, 4)
    assert ds.intrinsics == Intrinsics.from_K(P0[:, :3], shape[1], shape[0]) and ds.intrinsics.fx == fx
    np.testing.assert_allclose(ds.stamps, np.arange(51) * 0.1)
    frame = ds[1]
    stored = cv2.imread(str(root / "image_l" / "000001.png"), cv2.IMREAD_UNCHANGED)
    assert frame.image.shape == shape and frame.image.dtype == np.uint8
    np.testing.assert_array_equal(frame.image, stored)  # grey, as stored
    assert_pose_from_file(frame.T_world_cam, parse_matrix(root / "poses.txt")[1].reshape(3, 4))
    np.testing.assert_allclose(ds.pose(0), np.eye(4), atol=1e-9)


def test_kitti_poses_are_camera_to_world() -> None:
    # seq06 drives ~60 m nearly straight ahead: in the first camera's frame (the
    # world) the camera centre moves along +z (optical axis forward), and each
    # camera's z axis points along its direction of travel.
    poses = load_kitti(shared_dataset(KITTI) / "seq06_frames000-050").poses()
    centre_end = poses[-1, :3, 3]
    assert centre_end[2] > 40.0 and abs(centre_end[0]) < 0.25 * centre_end[2]
    travel = poses[-1, :3, 3] - poses[-6, :3, 3]
    assert poses[-1, :3, 2] @ travel / np.linalg.norm(travel) > 0.95


def test_kitti_rejects_mismatched_poses_and_splits(tmp_path: Path) -> None:
    (tmp_path / "image_l").mkdir()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "image_l" / f"{i:06d}.png"), np.full((6, 8), i, np.uint8))
    (tmp_path / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1 0\n")
    (tmp_path / "calib.txt").write_text("P0: 10 0 4 0 0 10 3 0 0 0 1 0\n")
    assert detect_layout(tmp_path) == "kitti"
    with pytest.raises(ValueError, match="2 images but 1 poses"):
        load_kitti(tmp_path)
    with pytest.raises(ValueError, match="no split lists"):
        load_kitti(tmp_path, "query")


# --- Strecha -------------------------------------------------------------------------------


@pytest.mark.parametrize("scene, count", [("fountain-P11", 11), ("entry-P10", 10),
                                          ("Herz-Jesus-P25", 25), ("castle-P30", 30)])
def test_strecha_counts_and_intrinsics(scene: str, count: int) -> None:
    root = shared_dataset(STRECHA) / scene
    ds = load_strecha(root)
    assert len(ds) == count
    first = (root / "cameras_1536x1024.txt").read_text().splitlines()[1].split()
    assert ds.names[0] == Path(first[0]).stem
    fx, fy, cx, cy = map(float, first[1:5])
    assert ds[0].intrinsics == Intrinsics(fx, fy, cx, cy, 1536, 1024)
    np.testing.assert_array_equal(ds.stamps, np.arange(count))


def test_strecha_projection_matches_the_benchmark_convention() -> None:
    root = shared_dataset(STRECHA) / "fountain-P11"
    frame = load_strecha(root)[0]
    assert frame.image.shape == (1024, 1536, 3)
    values = np.array((root / "cameras_1536x1024.txt").read_text().splitlines()[1].split()[1:], dtype=float)
    K_33 = Intrinsics(*values[:4], 1536, 1024).K
    R, C = values[4:13].reshape(3, 3), values[13:16]
    assert_pose_from_file(frame.T_world_cam, make_pose(R, C))  # R camera-to-world, C the centre
    P_34 = K_33 @ np.hstack([R.T, -R.T @ C[:, None]])
    # Points 2-20 m in front of the camera, in world coordinates.
    rng = np.random.default_rng(0)
    X_cam_n3 = np.column_stack([rng.uniform(-3, 3, 50), rng.uniform(-2, 2, 50), rng.uniform(2, 20, 50)])
    X_world_n4 = np.column_stack([X_cam_n3 @ R.T + C, np.ones(50)])
    uvw_benchmark = X_world_n4 @ P_34.T
    uvw_ours = (X_world_n4 @ invert(frame.T_world_cam).T)[:, :3] @ K_33.T
    np.testing.assert_allclose(uvw_ours[:, :2] / uvw_ours[:, 2:], uvw_benchmark[:, :2] / uvw_benchmark[:, 2:],
                               atol=2e-3)  # the file's rotation is snapped to a true one: ~1e-3 px here
    assert np.all(uvw_ours[:, 2] > 0)


# --- posed folders -------------------------------------------------------------------------


def synthetic_frames(n: int = 4, grey: bool = False, with_depth: bool = True) -> list[Frame]:
    rng = np.random.default_rng(7)
    camera = Intrinsics(40.5, 41.25, 15.75, 11.5, 32, 24)
    frames = []
    for i in range(n):
        image = rng.integers(0, 256, (24, 32) if grey else (24, 32, 3), dtype=np.uint8)
        T_world_cam = make_pose(Rotation.random(random_state=i).as_matrix(), rng.normal(size=3) * 3.0)
        depth = None
        if with_depth:  # whole millimetres, some invalid
            depth = rng.integers(0, 9000, (24, 32)).astype(np.float32) / np.float32(1000.0)
        frames.append(Frame(image, camera, T_world_cam, stamp=1.7e9 + i / 30 + 1e-7, depth=depth,
                            name=f"cam/{i:03d} shot"))
    return frames


def test_write_posed_folder_round_trip_is_lossless(tmp_path: Path) -> None:
    frames = synthetic_frames()
    splits = {"mapping": [frames[0].name, frames[2].name], "query": ["frame-000001", frames[3].name]}
    out = write_posed_folder(iter(frames), tmp_path / "scene", splits)
    assert detect_layout(out) == "posed-folder"
    ds = open_dataset(out, with_depth=True)
    assert ds.kind == "posed-folder" and len(ds) == 4 and ds.intrinsics == frames[0].intrinsics
    for original, loaded in zip(frames, ds):
        assert loaded.image.dtype == np.uint8
        np.testing.assert_array_equal(loaded.image, original.image)
        np.testing.assert_allclose(loaded.T_world_cam, original.T_world_cam, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(loaded.depth, original.depth)
        assert loaded.stamp == original.stamp and loaded.meta["source_name"] == original.name
    assert open_dataset(out, split="mapping").names == ["frame-000000", "frame-000002"]
    assert len(open_dataset(out, split="query")) == 2
    assert ds[-1].name == "frame-000003" and [f.name for f in ds[1:3]] == ["frame-000001", "frame-000002"]
    with pytest.raises(IndexError):
        ds[4]


def test_posed_folder_grey_without_depth_and_hand_written_intrinsics(tmp_path: Path) -> None:
    frames = synthetic_frames(n=2, grey=True, with_depth=False)
    out = write_posed_folder(frames, tmp_path)
    loaded = open_dataset(out, with_depth=True)[1]
    np.testing.assert_array_equal(loaded.image, frames[1].image)
    assert loaded.image.ndim == 2 and loaded.depth is None
    # A hand-made folder: intrinsics.txt (fx fy cx cy width height), no stamps -> index / 30 Hz.
    (out / "intrinsics.yaml").unlink()
    (out / "stamps.txt").unlink()
    (out / "intrinsics.txt").write_text("40.5 41.25 15.75 11.5 32 24\n")
    ds = open_dataset(out)
    assert ds.intrinsics == frames[0].intrinsics and list(ds.stamps) == [0.0, 1 / 30]


def test_write_posed_folder_refuses_bad_input(tmp_path: Path) -> None:
    frames = synthetic_frames(n=2)
    write_posed_folder(frames, tmp_path / "a")
    with pytest.raises(ValueError, match="is not empty"):
        write_posed_folder(frames, tmp_path / "a")
    other = Frame(frames[1].image, Intrinsics(41.0, 41.0, 16.0, 12.0, 32, 24),
                  frames[1].T_world_cam)
    with pytest.raises(ValueError, match="one camera"):
        write_posed_folder([frames[0], other], tmp_path / "b")
    with pytest.raises(ValueError, match=r"split 'query' names frames that were not written.*nope"):
        write_posed_folder(frames, tmp_path / "c", {"query": ["nope"]})
    with pytest.raises(ValueError, match="split name 'stamps'"):
        write_posed_folder(frames, tmp_path / "d", {"stamps": []})


# --- detection and errors ------------------------------------------------------------------


@pytest.mark.parametrize("dataset, sub, kind", [(REDKITCHEN, "", "redkitchen"), (STAIRS, "", "7scenes"),
                                                (KITTI, "seq06_frames000-050", "kitti"),
                                                (STRECHA, "castle-P30", "strecha")])
def test_open_dataset_detects_each_layout(dataset: str, sub: str, kind: str) -> None:
    root = shared_dataset(dataset) / sub
    assert detect_layout(root) == kind
    assert open_dataset(root).kind == kind


def test_open_dataset_names_path_and_known_layouts(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    layouts = r".*known layouts: 7scenes.*posed-folder.*redkitchen.*kitti.*strecha"
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + layouts):
        open_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"unknown dataset kind 'colmap'; valid: 'auto', '7scenes'"):
        open_dataset(tmp_path, kind="colmap")
    with pytest.raises(ValueError, match="is not a directory"):
        open_dataset(tmp_path / "missing")


def test_broken_posed_folders_give_clear_errors(tmp_path: Path) -> None:
    out = write_posed_folder(synthetic_frames(n=3), tmp_path / "scene", {"mapping": ["frame-000000"]})
    frames_dir = out / "frames"
    with pytest.raises(ValueError, match=r"unknown split 'train'.*\['mapping'\]"):
        open_dataset(out, split="train")
    # Images are read lazily: a corrupt one fails on access, naming the file.
    (frames_dir / "frame-000000.color.png").write_bytes(b"not a png")
    ds = open_dataset(out)
    assert ds[1].name == "frame-000001"
    with pytest.raises(ValueError, match=r"cannot read image .*frame-000000\.color\.png"):
        ds[0]
    np.savetxt(frames_dir / "frame-000001.pose.txt", np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"frame-000001\.pose\.txt: rotation is not orthonormal"):
        ds.pose(1)
    (frames_dir / "frame-000002.pose.txt").unlink()
    with pytest.raises(ValueError, match=r"missing pose file .*frame-000002\.pose\.txt"):
        open_dataset(out)
