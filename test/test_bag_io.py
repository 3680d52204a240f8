"""aceg_ros.bag_io and aceg-make-bag: real rosbag2 bags (mcap and sqlite3) written and read back.

Bags in these tests are either written by ``write_bag`` or built here message by
message with rosbags and the ROS 2 message definitions, so the reader is checked
against independently made messages (other pose types, TF layouts, stamps).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from scipy.spatial.transform import Rotation

from aceg_model.frames import Frame, Intrinsics
from aceg_model.geometry import make_pose
from aceg_ros.bag_io import (
    DEFAULT_CAMERA_INFO_TOPIC,
    DEFAULT_IMAGE_TOPIC,
    DEFAULT_POSE_TOPIC,
    bag_info,
    iter_bag_frames,
    read_bag_frames,
    write_bag,
)
from aceg_ros.image_codec import encode_compressed, encode_image

TS = get_typestore(Stores.ROS2_KILTED)
MSG = TS.types
INTRINSICS = Intrinsics(40.0, 41.0, 15.5, 11.5, 32, 24)
STORAGES = ["mcap", "sqlite3"]


def random_pose(rng: np.random.Generator) -> np.ndarray:
    return make_pose(Rotation.from_rotvec(rng.normal(size=3)).as_matrix(), rng.normal(size=3) * 2.0)


def make_frames(n: int = 5, colour: bool = True, start: float = 10.0, dt: float = 0.1, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    shape = (24, 32, 3) if colour else (24, 32)
    return [Frame(rng.integers(0, 256, shape, dtype=np.uint8), INTRINSICS, random_pose(rng), stamp=start + i * dt,
                  name=f"f{i}") for i in range(n)]


def assert_same_frames(got: list[Frame], want: list[Frame], pose_tol: float = 1e-6) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.image.dtype == np.uint8 and np.array_equal(g.image, w.image)
        assert g.intrinsics == w.intrinsics
        assert abs(g.stamp - w.stamp) < 1e-9
        np.testing.assert_allclose(g.T_world_cam, w.T_world_cam, atol=pose_tol)


def no_leftovers(folder: Path, bag_name: str) -> bool:
    """True when no temporary ``.<bag>.partial-*`` folder was left behind."""
    return not list(folder.glob(f".{bag_name}.partial-*"))


# --- hand-made messages ---------------------------------------------------------------------------


def header(stamp: float, frame_id: str):
    ns = round(stamp * 1e9)
    return MSG["std_msgs/msg/Header"](stamp=MSG["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9),
                                      frame_id=frame_id)


def pose(T: np.ndarray):
    x, y, z = T[:3, 3]
    qx, qy, qz, qw = Rotation.from_matrix(T[:3, :3]).as_quat()
    return MSG["geometry_msgs/msg/Pose"](position=MSG["geometry_msgs/msg/Point"](x=x, y=y, z=z),
                                         orientation=MSG["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw))


def pose_message(msgtype: str, stamp: float, T: np.ndarray):
    if msgtype == "geometry_msgs/msg/PoseStamped":
        return MSG[msgtype](header=header(stamp, "map"), pose=pose(T))
    with_cov = MSG["geometry_msgs/msg/PoseWithCovariance"](pose=pose(T), covariance=np.eye(6).ravel() * 0.01)
    if msgtype == "geometry_msgs/msg/PoseWithCovarianceStamped":
        return MSG[msgtype](header=header(stamp, "map"), pose=with_cov)
    zero = MSG["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
    twist = MSG["geometry_msgs/msg/TwistWithCovariance"](
        twist=MSG["geometry_msgs/msg/Twist"](linear=zero, angular=zero), covariance=np.zeros(36))
    return MSG[msgtype](header=header(stamp, "map"), child_frame_id="camera", pose=with_cov, twist=twist)


def tf_message(stamp: float, edges: list[tuple[str, str, np.ndarray]]):
    transforms = []
    for parent, child, T in edges:
        x, y, z = T[:3, 3]
        qx, qy, qz, qw = Rotation.from_matrix(T[:3, :3]).as_quat()
        transform = MSG["geometry_msgs/msg/Transform"](
            translation=MSG["geometry_msgs/msg/Vector3"](x=x, y=y, z=z),
            rotation=MSG["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw))
        transforms.append(MSG["geometry_msgs/msg/TransformStamped"](header=header(stamp, parent),
                                                                     child_frame_id=child, transform=transform))
    return MSG["tf2_msgs/msg/TFMessage"](transforms=transforms)


def image_message(stamp: float, image: np.ndarray, encoding: str = "rgb8", frame_id: str = "camera"):
    height, width, step, data = encode_image(image, encoding)
    return MSG["sensor_msgs/msg/Image"](header=header(stamp, frame_id), height=height, width=width,
                                        encoding=encoding, is_bigendian=0, step=step,
                                        data=np.frombuffer(data, np.uint8))


def compressed_message(stamp: float, fmt: str, data: bytes, frame_id: str = "camera"):
    return MSG["sensor_msgs/msg/CompressedImage"](header=header(stamp, frame_id), format=fmt,
                                                  data=np.frombuffer(data, np.uint8))


def info_message(stamp: float, intrinsics: Intrinsics = INTRINSICS, d: tuple = (0.0,) * 5, frame_id: str = "camera"):
    K = intrinsics.K
    roi = MSG["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return MSG["sensor_msgs/msg/CameraInfo"](
        header=header(stamp, frame_id), height=intrinsics.height, width=intrinsics.width,
        distortion_model="plumb_bob", d=np.array(d, float), k=K.ravel(), r=np.eye(3).ravel(),
        p=np.hstack([K, np.zeros((3, 1))]).ravel(), binning_x=0, binning_y=0, roi=roi)


def write_messages(path: Path, messages: list[tuple[str, float, object]], storage: str = "mcap",
                   empty_topics: tuple[tuple[str, str], ...] = ()) -> Path:
    """A bag of ``(topic, stamp s, message)``, written in stamp order (stable)."""
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for topic, msgtype in empty_topics:
            conns[topic] = writer.add_connection(topic, msgtype, typestore=TS)
        for topic, stamp, msg in sorted(messages, key=lambda m: m[1]):
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msg.__msgtype__, typestore=TS)
            writer.write(conns[topic], round(stamp * 1e9), TS.serialize_cdr(msg, msg.__msgtype__))
    return path


def camera_messages(frames: list[Frame]) -> list[tuple[str, float, object]]:
    """camera_info + raw image messages for ``frames`` (rgb8 / mono8), frame_id 'camera'."""
    out = []
    for f in frames:
        out.append(("/cam/info", f.stamp, info_message(f.stamp)))
        out.append(("/cam/image", f.stamp, image_message(f.stamp, f.image, "rgb8" if f.image.ndim == 3 else "mono8")))
    return out


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("colour,compressed", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["rgb8", "mono8", "png-rgb", "png-mono"])
def test_round_trip_is_exact(tmp_path: Path, storage: str, colour: bool, compressed: bool) -> None:
    frames = make_frames(colour=colour)
    summary = write_bag(frames, tmp_path / "bag", storage, compressed=compressed)
    topic = DEFAULT_IMAGE_TOPIC + ("/compressed" if compressed else "")
    assert summary.frames == 5 and summary.topics[topic] == 5 and summary.size_bytes > 0
    assert no_leftovers(tmp_path, "bag")

    info = bag_info(tmp_path / "bag")
    assert info["topics"][topic] == {"type": "sensor_msgs/msg/" + ("CompressedImage" if compressed else "Image"),
                                     "count": 5}
    assert info["topics"]["/tf"]["count"] == 5 and info["topics"][DEFAULT_POSE_TOPIC]["count"] == 5

    got, report = read_bag_frames(tmp_path / "bag", topic, DEFAULT_CAMERA_INFO_TOPIC, DEFAULT_POSE_TOPIC)
    assert_same_frames(got, frames)
    assert (report.images, report.frames, report.dropped_no_pose, report.dropped_before_camera_info) == (5, 5, 0, 0)
    assert "PoseStamped" in report.pose_source


def test_jpeg_bag_is_close(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:24, 0:32]
    smooth = np.stack([xx * 7, yy * 9, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    frames = [Frame(smooth, INTRINSICS, np.eye(4), stamp=1.0)]
    write_bag(frames, tmp_path / "bag", compressed=True, compression="jpeg")
    got, _ = read_bag_frames(tmp_path / "bag", DEFAULT_IMAGE_TOPIC + "/compressed", pose_topic=DEFAULT_POSE_TOPIC)
    assert np.abs(got[0].image.astype(int) - smooth).mean() < 3.0


@pytest.mark.parametrize("storage,odom_static", [("mcap", True), ("sqlite3", False)])
def test_tf_chain_gives_the_pose_topic_poses(tmp_path: Path, storage: str, odom_static: bool) -> None:
    frames = make_frames(6)
    T_map_odom = make_pose(Rotation.from_rotvec([0.1, -0.4, 1.2]).as_matrix(), [3.0, -1.0, 0.5])
    write_bag(frames, tmp_path / "bag", storage, odom_frame="odom", T_map_odom=T_map_odom, odom_static=odom_static)
    topics = bag_info(tmp_path / "bag")["topics"]
    assert ("/tf_static" in topics) == odom_static

    from_topic, _ = read_bag_frames(tmp_path / "bag", pose_topic=DEFAULT_POSE_TOPIC)
    from_tf, report = read_bag_frames(tmp_path / "bag")  # pose_topic None: TF map -> image frame_id
    assert_same_frames(from_tf, frames)
    for a, b in zip(from_tf, from_topic):
        np.testing.assert_allclose(a.T_world_cam, b.T_world_cam, atol=1e-9)
    kind = "static" if odom_static else "dynamic"
    assert f"map -> odom ({kind}) -> camera_optical_frame (dynamic)" in report.pose_source

    # The inverse lookup (camera -> map) is the inverted pose.
    inverse, _ = read_bag_frames(tmp_path / "bag", tf_parent="camera_optical_frame", tf_child="map")
    np.testing.assert_allclose(inverse[0].T_world_cam @ frames[0].T_world_cam, np.eye(4), atol=1e-9)


def test_tf_chain_with_sibling_frames_and_interpolated_edges(tmp_path: Path) -> None:
    """map -> odom (static), odom -> base (dynamic, 100 Hz), base -> camera (static), plus a sibling."""
    rng = np.random.default_rng(3)
    frames = make_frames(4, start=5.0, dt=0.2)
    T_map_odom, T_base_cam, T_base_lidar = random_pose(rng), random_pose(rng), random_pose(rng)
    msgs = camera_messages(frames)
    msgs.append(("/tf_static", 4.9, tf_message(4.9, [("map", "odom", T_map_odom), ("base", "camera", T_base_cam),
                                                      ("base", "lidar", T_base_lidar)])))
    # odom -> base sampled at 100 Hz around each image, offset so images fall between samples.
    for f in frames:
        T_odom_base = np.linalg.inv(T_map_odom) @ f.T_world_cam @ np.linalg.inv(T_base_cam)
        for s in (f.stamp - 0.005, f.stamp + 0.005):
            msgs.append(("/tf", s, tf_message(s, [("odom", "base", T_odom_base)])))
    bag = write_messages(tmp_path / "bag", msgs)
    got, report = read_bag_frames(bag, "/cam/image", "/cam/info")
    assert_same_frames(got, frames)
    assert report.pose_source.endswith("map -> odom (static) -> base (dynamic) -> camera (static)")
    assert report.pose_samples == 1 + 8  # TF messages: one static, two per image
    # A frame in another branch: lidar -> camera goes up to base and down again.
    got, report = read_bag_frames(bag, "/cam/image", "/cam/info", tf_parent="lidar", tf_child="camera")
    assert len(got) == 4 and "lidar -> base (inverse static) -> camera (static)" in report.pose_source
    np.testing.assert_allclose(got[0].T_world_cam, np.linalg.inv(T_base_lidar) @ T_base_cam, atol=1e-9)
    with pytest.raises(ValueError, match=r"frame 'nowhere' is not in the bag's TF tree; frames found: .*base"):
        read_bag_frames(bag, "/cam/image", "/cam/info", tf_child="nowhere")


@pytest.mark.parametrize("msgtype", ["geometry_msgs/msg/PoseWithCovarianceStamped", "nav_msgs/msg/Odometry",
                                     "geometry_msgs/msg/PoseStamped"])
def test_pose_topic_types(tmp_path: Path, msgtype: str) -> None:
    frames = make_frames(4, colour=False)
    msgs = camera_messages(frames) + [("/poses", f.stamp, pose_message(msgtype, f.stamp, f.T_world_cam))
                                      for f in frames]
    bag = write_messages(tmp_path / "bag", msgs, storage="sqlite3")
    got, report = read_bag_frames(bag, "/cam/image", "/cam/info", "/poses")
    assert_same_frames(got, frames)
    assert msgtype in report.pose_source


def test_interpolation_and_max_pose_gap(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pose_stamps = [1.0, 1.1, 1.2, 2.0]
    T_0 = random_pose(rng)
    # Second pose: a 0.8 rad turn about a fixed axis, so the slerp midpoint is a 0.4 rad turn.
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    T_1 = T_0.copy()
    T_1[:3, :3] = T_0[:3, :3] @ Rotation.from_rotvec(0.8 * axis).as_matrix()
    T_1[:3, 3] = T_0[:3, 3] + [0.4, -0.2, 1.0]
    poses = [T_0, T_1, random_pose(rng), random_pose(rng)]
    image_stamps = [0.9, 1.05, 1.15, 1.5, 1.96, 2.03, 2.2]
    valid = [False, True, True, False, False, True, False]  # gap 0.06 s
    images = [Frame(np.full((24, 32), i, np.uint8), INTRINSICS, np.eye(4), stamp=s) for i, s in enumerate(image_stamps)]
    msgs = camera_messages(images)
    msgs = [("/cam/info", 0.5, info_message(0.5))] + [m for m in msgs if m[0] == "/cam/image"]
    msgs += [("/pose", s, pose_message("geometry_msgs/msg/PoseStamped", s, T)) for s, T in zip(pose_stamps, poses)]
    bag = write_messages(tmp_path / "bag", msgs)

    got, report = read_bag_frames(bag, "/cam/image", "/cam/info", "/pose", max_pose_gap=0.06)
    assert [f.stamp for f in got] == pytest.approx([s for s, v in zip(image_stamps, valid) if v])
    assert (report.images, report.frames, report.dropped_no_pose) == (7, 3, 4)
    assert "4 with no pose within 60 ms" in str(report)

    # 1.05 s is halfway between T_0 and T_1: translation mean, rotation a 0.4 rad turn from T_0.
    mid = got[0].T_world_cam
    np.testing.assert_allclose(mid[:3, 3], (T_0[:3, 3] + T_1[:3, 3]) / 2, atol=1e-9)
    np.testing.assert_allclose(mid[:3, :3], T_0[:3, :3] @ Rotation.from_rotvec(0.4 * axis).as_matrix(), atol=1e-9)
    # After the last sample but within the gap: held at the last pose.
    np.testing.assert_allclose(got[2].T_world_cam, poses[3], atol=1e-9)

    # A wide gap keeps everything.
    got, report = read_bag_frames(bag, "/cam/image", "/cam/info", "/pose", max_pose_gap=1.0)
    assert (report.frames, report.dropped_no_pose) == (7, 0)


def test_images_before_the_first_camera_info_are_dropped(tmp_path: Path) -> None:
    frames = make_frames(5)
    msgs = [m for m in camera_messages(frames) if not (m[0] == "/cam/info" and m[1] < frames[2].stamp)]
    msgs += [("/pose", f.stamp, pose_message("geometry_msgs/msg/PoseStamped", f.stamp, f.T_world_cam))
             for f in frames]
    bag = write_messages(tmp_path / "bag", msgs)
    got, report = read_bag_frames(bag, "/cam/image", "/cam/info", "/pose")
    assert_same_frames(got, frames[2:])
    assert (report.images, report.dropped_before_camera_info, report.frames) == (5, 2, 3)


def test_iterator_streams_and_stops(tmp_path: Path) -> None:
    frames = make_frames(6)
    write_bag(frames, tmp_path / "bag", tf=False)
    stream, report = iter_bag_frames(tmp_path / "bag", pose_topic=DEFAULT_POSE_TOPIC, max_frames=4)
    assert report.frames == 0  # nothing decoded until iterated
    first = next(stream)
    assert np.array_equal(first.image, frames[0].image) and report.frames == 1
    assert len(list(stream)) == 3 and report.frames == 4
    # A single storage file reads like the bag folder.
    mcap = next((tmp_path / "bag").glob("*.mcap"))
    got, _ = read_bag_frames(mcap, pose_topic=DEFAULT_POSE_TOPIC)
    assert_same_frames(got, frames)


def test_distortion_is_refused_or_undistorted(tmp_path: Path) -> None:
    frames = make_frames(2)
    msgs = [("/cam/info", f.stamp, info_message(f.stamp, d=(-0.2, 0.05, 0.0, 0.0, 0.0))) for f in frames]
    msgs += [m for m in camera_messages(frames) if m[0] == "/cam/image"]
    msgs += [("/pose", f.stamp, pose_message("geometry_msgs/msg/PoseStamped", f.stamp, f.T_world_cam))
             for f in frames]
    bag = write_messages(tmp_path / "bag", msgs)
    with pytest.raises(ValueError, match=r"non-zero distortion .*plumb_bob.*undistort=True"):
        read_bag_frames(bag, "/cam/image", "/cam/info", "/pose")
    got, report = read_bag_frames(bag, "/cam/image", "/cam/info", "/pose", undistort=True)
    assert len(got) == 2 and report.undistorted
    assert got[0].image.shape == frames[0].image.shape and got[0].intrinsics != INTRINSICS


# --- bad input --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bags") / "small"
    write_bag(make_frames(3), path)
    return path


def test_missing_topic_names_it_and_lists_the_topics(small_bag: Path) -> None:
    with pytest.raises(ValueError, match=r"image topic '/nope' is not in bag .*topics found: .*"
                                         r"/camera/image_raw \(sensor_msgs/msg/Image, 3 msgs\)"):
        read_bag_frames(small_bag, "/nope", pose_topic=DEFAULT_POSE_TOPIC)
    with pytest.raises(ValueError, match=r"pose topic '/odom' is not in bag .*/camera/pose \(geometry_msgs/msg/Pose"):
        read_bag_frames(small_bag, pose_topic="/odom")
    with pytest.raises(ValueError, match=r"camera_info topic '/info' is not in bag .*/tf \(tf2_msgs/msg/TFMessage"):
        read_bag_frames(small_bag, camera_info_topic="/info")


def test_wrong_message_type(small_bag: Path) -> None:
    with pytest.raises(ValueError, match=r"image topic '/camera/pose' .* has type geometry_msgs/msg/PoseStamped; "
                                         r"expected sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage"):
        read_bag_frames(small_bag, "/camera/pose", pose_topic=DEFAULT_POSE_TOPIC)
    with pytest.raises(ValueError, match=r"pose topic '/camera/camera_info' .* type sensor_msgs/msg/CameraInfo"):
        read_bag_frames(small_bag, pose_topic="/camera/camera_info")


def test_missing_and_non_bag_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bag .*absent does not exist"):
        read_bag_frames(tmp_path / "absent")
    with pytest.raises(ValueError, match="does not exist"):
        bag_info(tmp_path / "absent")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not a readable rosbag2 bag"):
        read_bag_frames(tmp_path / "junk")
    (tmp_path / "fake.mcap").write_bytes(b"not an mcap file")
    with pytest.raises(ValueError, match="is not a readable rosbag2 bag"):
        read_bag_frames(tmp_path / "fake.mcap")


def test_empty_bag(tmp_path: Path) -> None:
    bag = write_messages(tmp_path / "empty", [], empty_topics=((DEFAULT_IMAGE_TOPIC, "sensor_msgs/msg/Image"),))
    assert bag_info(bag)["messages"] == 0
    with pytest.raises(ValueError, match="is empty"):
        read_bag_frames(bag)


def test_no_pose_source(tmp_path: Path) -> None:
    bag = write_messages(tmp_path / "bag", camera_messages(make_frames(2)))
    with pytest.raises(ValueError, match=r"no pose_topic given and bag .* has no /tf or /tf_static.*/cam/image"):
        read_bag_frames(bag, "/cam/image", "/cam/info")


def test_corrupt_compressed_image(tmp_path: Path) -> None:
    frames = make_frames(2)
    fmt, good = encode_compressed(frames[0].image, "png")
    msgs = [("/cam/info", f.stamp, info_message(f.stamp)) for f in frames]
    msgs += [("/cam/image/compressed", frames[0].stamp, compressed_message(frames[0].stamp, fmt, good)),
             ("/cam/image/compressed", frames[1].stamp, compressed_message(frames[1].stamp, fmt, good[:40]))]
    msgs += [("/pose", f.stamp, pose_message("geometry_msgs/msg/PoseStamped", f.stamp, f.T_world_cam))
             for f in frames]
    bag = write_messages(tmp_path / "bag", msgs)
    with pytest.raises(ValueError, match=r"image on /cam/image/compressed at 10.100000000 s: could not decode 40 "):
        read_bag_frames(bag, "/cam/image/compressed", "/cam/info", "/pose")
    stream, _ = iter_bag_frames(bag, "/cam/image/compressed", "/cam/info", "/pose")
    assert np.array_equal(next(stream).image, frames[0].image)  # the good one before it decodes


def test_unknown_and_unusable_encodings(tmp_path: Path) -> None:
    frames = make_frames(1)
    f = frames[0]
    bad = image_message(f.stamp, f.image)
    bad.encoding = "yuv422"
    depth = image_message(f.stamp, np.ones((24, 32), np.float32), "32FC1")
    pose_msg = ("/pose", f.stamp, pose_message("geometry_msgs/msg/PoseStamped", f.stamp, f.T_world_cam))
    info = ("/cam/info", f.stamp, info_message(f.stamp))
    bag = write_messages(tmp_path / "a", [info, ("/cam/image", f.stamp, bad), pose_msg])
    with pytest.raises(ValueError, match=r"unknown image encoding 'yuv422'; supported: rgb8"):
        read_bag_frames(bag, "/cam/image", "/cam/info", "/pose")
    bag = write_messages(tmp_path / "b", [info, ("/cam/image", f.stamp, depth), pose_msg])
    with pytest.raises(ValueError, match="32FC1 images .* cannot be posed frames"):
        read_bag_frames(bag, "/cam/image", "/cam/info", "/pose")


def test_refuses_to_overwrite_and_never_leaves_half_a_bag(tmp_path: Path) -> None:
    frames = make_frames(3)
    write_bag(frames, tmp_path / "bag")
    before = sorted(p.name for p in (tmp_path / "bag").iterdir())
    with pytest.raises(ValueError, match="already exists; refusing to overwrite"):
        write_bag(frames, tmp_path / "bag", "sqlite3")
    assert sorted(p.name for p in (tmp_path / "bag").iterdir()) == before

    def failing():
        yield from frames[:2]
        raise RuntimeError("camera unplugged")

    with pytest.raises(RuntimeError, match="camera unplugged"):
        write_bag(failing(), tmp_path / "broken")
    # Out of time order: a clear error, and again nothing at the final path.
    with pytest.raises(ValueError, match=r"frame 2 \('f0'\): stamp 10.000000000 s is not after"):
        write_bag(frames[:2] + frames[:1], tmp_path / "unordered", "sqlite3")
    with pytest.raises(ValueError, match="no frames"):
        write_bag([], tmp_path / "none")
    for name in ("broken", "unordered", "none"):
        assert not (tmp_path / name).exists() and no_leftovers(tmp_path, name)
    with pytest.raises(ValueError, match="unknown bag storage 'rosbag1'; valid: mcap, sqlite3"):
        write_bag(frames, tmp_path / "x", "rosbag1")
    with pytest.raises(ValueError, match="folder .* does not exist"):
        write_bag(frames, tmp_path / "no" / "such" / "bag")


# --- the CLI -----------------------------------------------------------------------------------------


def test_make_bag_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if importlib.util.find_spec("aceg_model.datasets") is None:
        pytest.skip("aceg_model.datasets is not there yet")
    from aceg_model.datasets import write_posed_folder

    from aceg_ros.make_bag import main

    frames = make_frames(4, start=0.0)
    write_posed_folder(frames, tmp_path / "scene")
    out = tmp_path / "scene.bag"
    rc = main(["--data", str(tmp_path / "scene"), "--kind", "folder", "--out", str(out), "--storage", "sqlite3",
               "--compressed", "png", "--rate", "10", "--time-offset", "100", "--max-frames", "3",
               "--odom-frame", "odom", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.count("\n") == 1 and "wrote 3 frames" in captured.out
    got, report = read_bag_frames(out, DEFAULT_IMAGE_TOPIC + "/compressed")  # poses through map -> odom -> camera
    assert [f.stamp for f in got] == pytest.approx([100.0, 100.1, 100.2])
    for g, w in zip(got, frames):
        assert np.array_equal(g.image, w.image) and g.intrinsics == w.intrinsics
        np.testing.assert_allclose(g.T_world_cam, w.T_world_cam, atol=1e-6)

    # User errors: a message, a non-zero status, no traceback.
    assert main(["--data", str(tmp_path / "scene"), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "b2")]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "scene"), "--out", str(tmp_path / "b3"), "--focal", "500"]) == 1
    assert "--focal applies to 7scenes and redkitchen" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "scene"), "--out", str(tmp_path / "b4"), "--rate", "-3"]) == 2
    assert "must be > 0" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "b5")]) == 2
    assert not any((tmp_path / n).exists() for n in ("b2", "b3", "b4", "b5"))
