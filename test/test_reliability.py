"""Reliability (issue 9): bad input into the running node, bad mapping data, damaged files, conversion properties.

Only what the other test modules do not already cover is here (issue 9 case -> existing test):

- unknown encoding, truncated data, a depth image, image/camera_info size mismatch, zero K, images
  before camera_info, distortion with undistort off, a noise image, still localizing afterwards:
  ``test_node.test_bad_messages_are_dropped_not_fatal``;
- newest-frame-only under load: ``test_node.test_newest_frame_only_when_behind``;
- missing / non-bag / empty bag, missing topics, wrong types, corrupt compressed images,
  unknown encodings: ``test_bag_io``; too few frames for ``map_scene``: ``test_model``;
- a failed or cancelled ``map_scene`` writes no file: ``test_node_mapping``;
- pickle refused, wrong version / kind, model-hash mismatch, wrong names / shapes / dtypes,
  NaN tensors, tampered header and offsets, sizes bounded, truncated map files, atomic writes:
  ``test_safe_files`` and ``test_model.test_map_file_round_trips_and_refuses_another_model``;
- image encode / decode round trips (hypothesis): ``test_image_codec``.

The long soak (thousands of frames over DDS, RSS, camera stop / restart, map swap under
load) is ``test/soak.py``, run by ``scripts/soak.sh``; it is not collected here.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

rclpy = pytest.importorskip("rclpy")
import torch  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from aceg_model.frames import Frame, Intrinsics  # noqa: E402
from aceg_model.geometry import make_pose  # noqa: E402
from aceg_model.mapping import MappingConfig, SceneMap, map_scene  # noqa: E402
from aceg_model.model import AcegModel  # noqa: E402
from aceg_model.pnp import PnPConfig  # noqa: E402
from aceg_model.safe_files import FileFormatError  # noqa: E402
from aceg_ros import bag_io  # noqa: E402
from aceg_ros import ros_conversions as rc  # noqa: E402
from aceg_ros.bag_io import read_bag_frames, write_bag  # noqa: E402
# The node-test fixtures (`scene`, `harness`) are shared; `ros` below is this module's rclpy context.
from test_node import (H, STAMP0, W, Harness, assert_pose_matches, camera_info_msg,  # noqa: E402, F401
                       camera_pose, harness, image_msg, render, scene, texture)
from test_node_mapping import SMALL, call, result  # noqa: E402

pytestmark = pytest.mark.ros
REPO = Path(__file__).resolve().parents[1]
MIN_INLIERS = PnPConfig().min_inliers  # the node's default (aceg_ros.params)


@pytest.fixture(scope="module")
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


def wall_frames(n: int, K: Intrinsics = SMALL, first_stamp: float = 10.0) -> list[Frame]:
    tex = texture(0)
    return [Frame(render(T, tex, K), K, T, stamp=first_stamp + 0.1 * i, name=f"f{i}")
            for i, T in enumerate(camera_pose(4.0 * i - 10.0, 2.0 * (i % 2), [0.05 * i, 0.02 * i, 0.0])
                                  for i in range(n))]


def bag_with_broken_pose(tmp_path: Path, name: str, bad_index: int, bad_q_xyzw, monkeypatch) -> Path:
    """A real bag (6 frames, /camera/pose, no TF) whose ``bad_index``-th pose carries ``bad_q_xyzw``."""
    good_pose_msg = bag_io._pose_msg
    calls = [0]

    def pose_msg(T):
        msg = good_pose_msg(T)
        if calls[0] == bad_index:
            msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w = map(float, bad_q_xyzw)
        calls[0] += 1
        return msg

    with monkeypatch.context() as m:
        m.setattr(bag_io, "_pose_msg", pose_msg)
        write_bag(wall_frames(6), tmp_path / name, "mcap", tf=False)
    assert calls[0] == 6
    return tmp_path / name


# --- 1. bad images into the running node, over DDS ---------------------------------------------------

def test_degenerate_frames_give_no_pose_and_say_why(harness, scene) -> None:
    h = harness()
    info = camera_info_msg()

    def counts() -> dict[str, int]:
        d = h.last_diag()
        return {k: int(v) for k, v in d[1].items() if k.startswith("rejected_")} if d else {}

    def send_and_expect(msg, key: str) -> dict:
        before = counts().get(key, 0)
        h.send(msg, info, until=lambda: counts().get(key, 0) > before)
        return h.last_diag()[1]

    # Empty payloads: a 0x0 image and a declared size with no bytes.
    empty = Image(height=0, width=0, encoding="rgb8", step=0, data=b"")
    empty.header.stamp = rc.ns_to_stamp(STAMP0 + 1)
    assert "zero size" in send_and_expect(empty, "rejected_bad_image")["last_rejection"]
    no_data = Image(height=H, width=W, encoding="rgb8", step=3 * W, data=b"")
    no_data.header.stamp = rc.ns_to_stamp(STAMP0 + 2)
    assert "0 bytes" in send_and_expect(no_data, "rejected_bad_image")["last_rejection"]
    # A float image full of NaN / inf: refused as an image, never turned into pixels.
    depth = np.full((H, W), np.nan, np.float32)
    depth[::2] = np.inf
    nan_img = Image(height=H, width=W, encoding="32FC1", step=4 * W, data=depth.tobytes())
    nan_img.header.stamp = rc.ns_to_stamp(STAMP0 + 3)
    assert "32FC1" in send_and_expect(nan_img, "rejected_bad_image")["last_rejection"]

    # Black, saturated, uniform grey: the node may not claim a pose from a picture with no content.
    degenerate = {STAMP0 + 10: np.zeros((H, W, 3), np.uint8), STAMP0 + 11: np.full((H, W, 3), 255, np.uint8),
                  STAMP0 + 12: np.full((H, W, 3), 128, np.uint8)}
    for stamp, image in degenerate.items():
        values = send_and_expect(image_msg(image, stamp), "rejected_not_localized")
        assert int(values["last_inliers"]) < MIN_INLIERS, values

    # A different place (another wall texture) than the map: no pose, or one backed by >= min_inliers.
    elsewhere = render(camera_pose(0.0, 0.0, [0.0, 0.0, 0.0]), texture(seed=7))
    before = sum(counts().values())
    h.send(image_msg(elsewhere, STAMP0 + 20), info,
           until=lambda: h.poses_at(STAMP0 + 20) or sum(counts().values()) > before)
    if h.poses_at(STAMP0 + 20):
        assert int(h.last_diag()[1]["last_inliers"]) >= MIN_INLIERS

    # camera_info with NaN or zero focal lengths: refused, the reason in diagnostics, no pose.
    for k, why in (([np.nan, 0, 319.5, 0, 500.0, 239.5, 0, 0, 1], "fx=nan"), ([0.0] * 9, "fx=0.0")):
        bad_info = camera_info_msg()
        bad_info.k = [float(x) for x in k]
        stamp = STAMP0 + 30 + len(why)
        h.send(image_msg(scene.images[0], stamp), bad_info,
               until=lambda w=why: (d := h.last_diag()) and "bad camera_info" in d[1]["last_rejection"]
               and w in d[1]["last_rejection"])
        assert not h.poses_at(stamp)
    status, _ = h.wait_for(lambda: (d := h.last_diag()) and d[0].message.startswith("not localizing") and d,
                           what="a WARN naming why the node is not localizing")
    assert "bad camera_info" in status.message

    # Still alive: a good camera_info and a good frame localize.
    stamp = STAMP0 + 99
    h.send(image_msg(scene.images[1], stamp), info, until=lambda: h.poses_at(stamp))
    assert_pose_matches(h.poses_at(stamp)[0], scene.poses[1], stamp)
    published = {rc.stamp_to_ns(m.header.stamp) for m in h.messages("pose")}
    assert published <= {STAMP0 + 20, stamp}, f"poses published for bad frames: {sorted(published)}"
    assert "rejected_error" not in h.last_diag()[1], "an internal error, not a clean refusal"


# --- 2. bad mapping data keeps the old map -----------------------------------------------------------

@pytest.fixture(scope="module")
def old_map(scene, tmp_path_factory) -> Path:
    """A valid map for the scene's model, made once; tests copy it and check it survives."""
    scene_map, _ = map_scene(scene.model, wall_frames(3), MappingConfig(iterations=1, batch_patches=256))
    path = tmp_path_factory.mktemp("maps") / "old.map.safetensors"
    scene_map.save(path)
    return path


def test_bad_bags_over_the_service_keep_the_old_map(harness, scene, old_map, tmp_path, monkeypatch) -> None:
    out = tmp_path / "maps" / "site.map.safetensors"
    out.parent.mkdir()
    out.write_bytes(old_map.read_bytes())
    original = out.read_bytes()
    nan_bag = bag_with_broken_pose(tmp_path, "nan_pose", 2, [np.nan, 0.0, 0.0, 1.0], monkeypatch)
    zero_bag = bag_with_broken_pose(tmp_path, "zero_quat", 4, [0.0, 0.0, 0.0, 0.0], monkeypatch)
    two = tmp_path / "two_frames"
    write_bag(wall_frames(2), two, "mcap")
    truncated = tmp_path / "truncated"  # a recording killed mid-file: no summary, no end magic
    write_bag(wall_frames(6), truncated, "mcap")
    mcap = next(truncated.glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: int(mcap.stat().st_size * 0.6)])
    h = harness(overrides={"mapping.output": str(out), "mapping.iterations": 2, "mapping.batch_patches": 256})
    for bag, expected in ((nan_bag, "quaternion must be finite and non-zero"),
                          (zero_bag, "quaternion must be finite and non-zero"),
                          (two, "at least 3 posed frames, got 2"),
                          (truncated, "not a readable rosbag2 bag")):
        assert h.node.set_parameters([Parameter("mapping.bag", value=str(bag))])[0].successful
        reply = result(h, call(h, "map_scene"), timeout=60.0)
        assert not reply.success and expected in reply.message, (expected, reply.message)
        assert out.read_bytes() == original, f"{bag.name}: the existing map changed"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "a temporary file was left behind"
    SceneMap.load(out, scene.model)  # still loadable
    # And the node still localizes with the map it had.
    stamp = STAMP0 + 7
    h.send(image_msg(scene.images[0], stamp), camera_info_msg(), until=lambda: h.poses_at(stamp))


def test_bad_frames_are_refused_before_mapping() -> None:
    frames = wall_frames(3)
    R_sheared = frames[0].T_world_cam.copy()
    R_sheared[:3, :3] *= 1.05
    with pytest.raises(ValueError, match="rotation is not orthonormal"):
        Frame(frames[0].image, SMALL, R_sheared, name="sheared")
    T_nan = frames[0].T_world_cam.copy()
    T_nan[0, 3] = np.nan
    with pytest.raises(ValueError, match="contains NaN or inf"):
        Frame(frames[0].image, SMALL, T_nan, name="nan")


def test_intrinsics_changing_mid_bag_are_applied_per_frame(tmp_path) -> None:
    wide = Intrinsics(100.0, 100.0, 79.5, 59.5, 160, 120)
    frames = wall_frames(3) + wall_frames(3, wide, first_stamp=20.0)
    write_bag(frames, tmp_path / "zoom", "mcap")
    read, report = read_bag_frames(tmp_path / "zoom", pose_topic="/camera/pose")
    assert report.frames == 6
    assert [f.intrinsics.fx for f in read] == [125.0] * 3 + [100.0] * 3, "each image keeps its own camera_info"


def test_out_of_order_pose_stamps_are_sorted() -> None:
    # Pose samples stored out of time order (a bag merged from two recorders): each stamp still gets its pose,
    # and a stamp between two samples is interpolated between its true neighbours, not between list neighbours.
    frames = wall_frames(4)
    shuffled = [2, 0, 3, 1]
    track = bag_io.PoseTrack([frames[i].stamp for i in shuffled], [frames[i].T_world_cam for i in shuffled])
    for f in frames:
        assert np.allclose(track.at(f.stamp, 0.0), f.T_world_cam, atol=1e-9)
    mid = track.at((frames[1].stamp + frames[2].stamp) / 2, 0.1)
    t_mid = (frames[1].T_world_cam[:3, 3] + frames[2].T_world_cam[:3, 3]) / 2
    assert np.allclose(mid[:3, 3], t_mid, atol=1e-9)


def test_killed_mapping_run_leaves_the_old_map(scene, old_map, tmp_path) -> None:
    model_file = tmp_path / "model.safetensors"
    scene.model.save(model_file)
    bag = tmp_path / "wall"
    write_bag(wall_frames(4), bag, "mcap")
    out_dir = tmp_path / "maps"
    out_dir.mkdir()
    out = out_dir / "site.map.safetensors"
    out.write_bytes(old_map.read_bytes())
    original = out.read_bytes()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "aceg_ros.map_cli", "--bag", str(bag), "--out", str(out),
                             "--model", str(model_file), "--iterations", "1000000", "--device", "cpu",
                             "--no-refine-poses", "--no-photo-depth"],  # what is killed is the optimization
                            cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        # tqdm redraws with '\r': read raw bytes until the bar shows optimization under way.
        seen = b""
        deadline = time.monotonic() + 120.0
        while not re.search(rb"\| *[1-9][0-9]*/1000000", seen):  # at least one iteration done
            chunk = proc.stderr.read1(4096)
            assert chunk, f"aceg-map exited before optimizing: {seen.decode(errors='replace')[-2000:]}"
            seen += chunk
            assert time.monotonic() < deadline, "aceg-map did not start optimizing within 120 s"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert out.read_bytes() == original, "the previous map changed"
    assert sorted(p.name for p in out_dir.iterdir()) == [out.name], "a temporary file was left at the final path"
    SceneMap.load(out, scene.model)


def test_map_cli_refuses_a_bad_sweep_scale_before_loading_anything(tmp_path, capsys) -> None:
    from aceg_ros import map_cli

    out = tmp_path / "site.map.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        map_cli.main(["--data", str(tmp_path), "--out", str(out), "--sweep-scale", "9"])
    assert exit_info.value.code == 2 and "--sweep-scale must be in 1..4" in capsys.readouterr().err
    assert not out.exists()


# --- 3. map and model files ----------------------------------------------------------------------------

def test_truncated_or_altered_model_file_is_refused(scene, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    scene.model.save(path)
    blob = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(FileFormatError, match="truncated"):
        AcegModel.load(truncated)
    # One low mantissa bit flipped in the last tensor byte pair: finite, right shape, wrong hash.
    altered = bytearray(blob)
    altered[-4] ^= 0x01
    (tmp_path / "altered.safetensors").write_bytes(bytes(altered))
    with pytest.raises(ValueError, match="model hash does not match its tensors"):
        AcegModel.load(tmp_path / "altered.safetensors")


def test_map_of_another_model_is_refused_naming_the_hashes(scene, old_map) -> None:
    torch.manual_seed(123)
    other = AcegModel(scene.model.config)
    with pytest.raises(ValueError, match=f"model_hash.*{other.model_hash()[:12]}|"
                                         f"model_hash.*{scene.model.model_hash()[:12]}"):
        SceneMap.load(old_map, other)


# --- 4. conversion properties -------------------------------------------------------------------------

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
quaternions = st.tuples(*[st.floats(-1.0, 1.0, allow_nan=False)] * 4).filter(
    lambda q: np.linalg.norm(q) > 1e-3)


def pose_of(q_xyzw, t) -> np.ndarray:
    q = np.asarray(q_xyzw) / np.linalg.norm(q_xyzw)
    return make_pose(Rotation.from_quat(q).as_matrix(), t)


@settings(max_examples=200, deadline=None)
@given(q=quaternions, t=st.tuples(finite, finite, finite), stamp_ns=st.integers(0, 2**62))
def test_property_pose_transform_messages_round_trip(q, t, stamp_ns) -> None:
    T = pose_of(q, t)
    pose = rc.matrix_to_pose(T)
    quat = np.array([pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w])
    assert np.isclose(np.linalg.norm(quat), 1.0, atol=1e-12), "a published quaternion is unit length"
    assert np.allclose(rc.pose_to_matrix(pose), T, atol=1e-9)
    ts = rc.transform_stamped(T, "map", "cam", rc.ns_to_stamp(stamp_ns))
    assert np.allclose(rc.transform_to_matrix(ts.transform), T, atol=1e-9)
    assert rc.stamp_to_ns(ts.header.stamp) == stamp_ns
    # q and -q are one rotation: either sign on the wire gives the same matrix.
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = map(float, -quat)
    assert np.allclose(rc.pose_to_matrix(pose), T, atol=1e-9)


@settings(max_examples=150, deadline=None)
@given(q_a=quaternions, t_a=st.tuples(finite, finite, finite), q_ab=quaternions,
       t_ab=st.tuples(*[st.floats(-5, 5)] * 3), seed=st.integers(0, 2**31 - 1),
       rank=st.integers(0, 6))
def test_property_covariance_stays_symmetric_psd_through_frame_changes(q_a, t_a, q_ab, t_ab, seed, rank) -> None:
    rng = np.random.default_rng(seed)
    L = rng.normal(scale=rng.uniform(1e-4, 1.0), size=(6, rank))
    cov_a = L @ L.T  # PSD, possibly rank-deficient
    T_map_a = pose_of(q_a, t_a)
    T_map_b = T_map_a @ pose_of(q_ab, t_ab)
    cov_b = rc.covariance_of_attached_frame(cov_a, T_map_a, T_map_b)
    assert np.allclose(cov_b, cov_b.T, atol=1e-12 * max(1.0, np.abs(cov_b).max()))
    assert np.linalg.eigvalsh((cov_b + cov_b.T) / 2).min() >= -1e-9 * max(1.0, np.abs(cov_b).max())
    msg = rc.pose_with_covariance(T_map_b, cov_b, "map", rc.ns_to_stamp(STAMP0))
    wire = np.asarray(msg.pose.covariance).reshape(6, 6)
    assert np.all(np.isfinite(wire)) and np.allclose(wire, wire.T)
    assert np.all(np.diag(wire) > 0), "what goes on the wire is never a zero (over-confident) variance"
    assert np.linalg.eigvalsh(wire).min() >= -1e-9 * max(1.0, np.abs(wire).max())
    assert np.allclose(rc.pose_to_matrix(msg.pose.pose), T_map_b, atol=1e-9)
