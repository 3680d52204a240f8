"""Posed camera images <-> rosbag2 bags (sqlite3 and mcap), with the pure-Python ``rosbags``.

No rclpy needed: mapping and replay tools read bags on machines without ROS.

Bag layout written by :func:`write_bag` (all names are parameters):

- ``/camera/image_raw`` sensor_msgs/Image (rgb8 colour, mono8 grey), or
  ``/camera/image_raw/compressed`` sensor_msgs/CompressedImage (PNG lossless, or JPEG);
  ``header.frame_id`` is the camera's optical frame (``camera_optical_frame``);
- ``/camera/camera_info`` sensor_msgs/CameraInfo, one per image, K and P from
  the frame's intrinsics, plumb_bob with zero distortion;
- ``/camera/pose`` geometry_msgs/PoseStamped of the camera in ``map`` (``T_map_cam``);
- ``/tf`` tf2_msgs/TFMessage ``map -> camera_optical_frame``, or with an
  ``odom_frame`` the chain ``map -> odom`` (on ``/tf_static``, or on ``/tf``)
  plus ``odom -> camera_optical_frame`` on ``/tf``.

Every message is stamped with the frame's stamp (``Frame.stamp`` seconds, as
the header stamp and as the bag's receive time).

:func:`read_bag_frames` / :func:`iter_bag_frames` go the other way: images plus
the latest CameraInfo become :class:`~aceg_model.frames.Frame`s, posed from a
pose topic (PoseStamped, PoseWithCovarianceStamped or nav_msgs/Odometry) or
from the bag's TF tree, interpolated to each image's header stamp.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from rosbags.interfaces import (
    Connection,
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
    Typestore,
)
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from aceg_model.frames import Frame, Intrinsics, check_pose
from aceg_model.geometry import interpolate_poses, invert, pose_from_quat, quat_from_pose
from aceg_ros.image_codec import (
    COMPRESSED_FORMATS,
    DEFAULT_JPEG_QUALITY,
    decode_compressed,
    decode_image,
    encode_compressed,
    encode_image,
)

# --- defaults --------------------------------------------------------------------------------

DEFAULT_IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_SUFFIX = "/compressed"  # image_transport's compressed sub-topic
DEFAULT_CAMERA_INFO_TOPIC = "/camera/camera_info"
DEFAULT_POSE_TOPIC = "/camera/pose"
DEFAULT_TF_TOPIC = "/tf"
DEFAULT_TF_STATIC_TOPIC = "/tf_static"
DEFAULT_MAP_FRAME = "map"
DEFAULT_ODOM_FRAME = "odom"
DEFAULT_CAMERA_FRAME = "camera_optical_frame"
DEFAULT_STORAGE = "mcap"
DEFAULT_MAX_POSE_GAP_S = 0.05  # a 20 Hz pose source still brackets every image
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
BAG_VERSION = Writer.VERSION_LATEST  # rosbag2 metadata version 9, what Kilted writes
TYPESTORE = Stores.ROS2_KILTED  # the ROS 2 wheels this project runs on

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
POSE_STAMPED = "geometry_msgs/msg/PoseStamped"
POSE_WITH_COVARIANCE = "geometry_msgs/msg/PoseWithCovarianceStamped"
ODOMETRY = "nav_msgs/msg/Odometry"
TF_MESSAGE = "tf2_msgs/msg/TFMessage"
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)
POSE_TYPES = (POSE_STAMPED, POSE_WITH_COVARIANCE, ODOMETRY)
UNDISTORT_MODELS = ("plumb_bob", "rational_polynomial")  # what cv2.undistort understands

_INFINITE = QosTime(sec=0, nsec=0)  # rmw's "unspecified": the default, infinite
# /tf_static is latched in ROS 2 (TRANSIENT_LOCAL): `ros2 bag play` must offer it that way too.
_LATCHED_QOS = Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL,
                   _INFINITE, _INFINITE, QosLiveliness.AUTOMATIC, _INFINITE, False)


@functools.cache
def typestore() -> Typestore:
    """The rosbags type store used to (de)serialize every message."""
    return get_typestore(TYPESTORE)


# --- small conversions -------------------------------------------------------------------------


def _stamp_ns(stamp_s: float, what: str) -> int:
    """Seconds -> integer nanoseconds; ROS time is unsigned."""
    if not np.isfinite(stamp_s) or stamp_s < 0:
        raise ValueError(f"{what}: stamp must be finite and >= 0 s, got {stamp_s}")
    return int(round(float(stamp_s) * 1e9))


def _header(stamp_ns: int, frame_id: str):
    ts = typestore().types
    time = ts["builtin_interfaces/msg/Time"](sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
    return ts["std_msgs/msg/Header"](stamp=time, frame_id=frame_id)


def _header_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _pose_msg(T: np.ndarray):
    ts = typestore().types
    t, q = quat_from_pose(T)
    return ts["geometry_msgs/msg/Pose"](position=ts["geometry_msgs/msg/Point"](*map(float, t)),
                                        orientation=ts["geometry_msgs/msg/Quaternion"](*map(float, q)))


def _transform_msg(stamp_ns: int, parent: str, child: str, T: np.ndarray):
    ts = typestore().types
    t, q = quat_from_pose(T)
    transform = ts["geometry_msgs/msg/Transform"](translation=ts["geometry_msgs/msg/Vector3"](*map(float, t)),
                                                  rotation=ts["geometry_msgs/msg/Quaternion"](*map(float, q)))
    return ts["geometry_msgs/msg/TransformStamped"](header=_header(stamp_ns, parent), child_frame_id=child,
                                                    transform=transform)


def _pose_from_msg(pose) -> np.ndarray:
    """4x4 transform of a geometry_msgs/Pose (or Transform: translation/rotation)."""
    p = pose.position if hasattr(pose, "position") else pose.translation
    q = pose.orientation if hasattr(pose, "orientation") else pose.rotation
    return pose_from_quat(np.array([p.x, p.y, p.z]), np.array([q.x, q.y, q.z, q.w]))


def _camera_info_msg(stamp_ns: int, frame_id: str, intrinsics: Intrinsics):
    ts = typestore().types
    K = intrinsics.K
    roi = ts["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return ts[CAMERA_INFO](
        header=_header(stamp_ns, frame_id), height=intrinsics.height, width=intrinsics.width,
        distortion_model="plumb_bob", d=np.zeros(5), k=K.ravel(), r=np.eye(3).ravel(),
        p=np.hstack([K, np.zeros((3, 1))]).ravel(), binning_x=0, binning_y=0, roi=roi)


# --- writing -----------------------------------------------------------------------------------


@dataclass
class BagWriteSummary:
    """What :func:`write_bag` wrote: the bag, its frames, messages per topic, span and size."""

    path: Path
    storage: str
    frames: int
    topics: dict[str, int]
    start_s: float
    end_s: float
    size_bytes: int

    def __str__(self) -> str:
        topics = ", ".join(f"{name} x{count}" for name, count in self.topics.items())
        return (f"wrote {self.frames} frames to {self.path} ({self.storage}, "
                f"{self.size_bytes / 1e6:.1f} MB, {self.end_s - self.start_s:.2f} s of data): {topics}")


def write_bag(
    frames: Iterable[Frame],
    out: Path,
    storage: str = DEFAULT_STORAGE,
    *,
    image_topic: str | None = None,
    compressed: bool = False,
    compression: str = "png",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    camera_info_topic: str = DEFAULT_CAMERA_INFO_TOPIC,
    pose_topic: str | None = DEFAULT_POSE_TOPIC,
    tf: bool = True,
    tf_topic: str = DEFAULT_TF_TOPIC,
    tf_static_topic: str = DEFAULT_TF_STATIC_TOPIC,
    map_frame: str = DEFAULT_MAP_FRAME,
    camera_frame: str = DEFAULT_CAMERA_FRAME,
    odom_frame: str | None = None,
    T_map_odom: np.ndarray | None = None,
    odom_static: bool = True,
    progress: bool = False,
) -> BagWriteSummary:
    """Write posed frames as a rosbag2 bag directory at ``out`` (see the module docstring).

    Args:
        frames: posed images with strictly increasing ``stamp`` (seconds, >= 0).
        out: the bag directory to create; it must not exist. The bag is written to a
            temporary sibling and renamed into place, so ``out`` is never half-written.
        storage: 'mcap' or 'sqlite3'.
        image_topic: default ``/camera/image_raw`` (``.../compressed`` when ``compressed``).
        compressed: write sensor_msgs/CompressedImage with ``compression`` 'png'
            (lossless) or 'jpeg' (``jpeg_quality`` 0-100) instead of raw images.
        pose_topic: PoseStamped of ``T_map_cam`` in ``map_frame``; None writes none.
        tf: also publish the pose as TF ``map_frame -> camera_frame``.
        odom_frame: publish TF as the chain ``map -> odom -> camera`` instead, with the
            constant ``T_map_odom`` (4x4, default identity) on ``tf_static_topic`` when
            ``odom_static`` else on ``tf_topic`` with every frame.
        progress: show a tqdm progress bar on stderr.

    Raises ``ValueError`` for an existing ``out``, bad options, or frames out of time order.
    """
    out = Path(out)
    if storage not in STORAGES:
        raise ValueError(f"unknown bag storage {storage!r}; valid: {', '.join(STORAGES)}")
    if compressed and compression not in COMPRESSED_FORMATS:
        raise ValueError(f"unknown compression {compression!r}; valid: {', '.join(COMPRESSED_FORMATS)}")
    if out.exists() or out.is_symlink():
        raise ValueError(f"{out} already exists; refusing to overwrite a bag (remove it or choose another path)")
    if not out.parent.is_dir():
        raise ValueError(f"cannot write bag {out}: folder {out.parent} does not exist")
    if image_topic is None:
        image_topic = DEFAULT_IMAGE_TOPIC + (COMPRESSED_SUFFIX if compressed else "")
    T_map_odom = check_pose(np.eye(4) if T_map_odom is None else T_map_odom, what="T_map_odom")

    # Write next to ``out`` (same filesystem, so the final rename is atomic), in a folder of
    # its own so the storage file inside is already named after ``out``.
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp_bag = tmp_root / out.name
        counts, n_frames, span = _write_messages(
            frames, tmp_bag, STORAGES[storage], image_topic=image_topic,
            compression=compression if compressed else None, jpeg_quality=jpeg_quality,
            camera_info_topic=camera_info_topic, pose_topic=pose_topic, tf=tf, tf_topic=tf_topic,
            tf_static_topic=tf_static_topic, map_frame=map_frame, camera_frame=camera_frame,
            odom_frame=odom_frame, T_map_odom=T_map_odom, odom_static=odom_static, progress=progress)
        if out.exists():
            raise ValueError(f"{out} appeared while the bag was being written; refusing to overwrite it")
        os.rename(tmp_bag, out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BagWriteSummary(out, storage, n_frames, counts, span[0], span[1], size)


def _write_messages(frames: Iterable[Frame], path: Path, plugin: StoragePlugin, *, image_topic: str,
                    compression: str | None, jpeg_quality: int, camera_info_topic: str,
                    pose_topic: str | None, tf: bool, tf_topic: str, tf_static_topic: str, map_frame: str,
                    camera_frame: str, odom_frame: str | None, T_map_odom: np.ndarray, odom_static: bool,
                    progress: bool) -> tuple[dict[str, int], int, tuple[float, float]]:
    """The body of :func:`write_bag`: returns (messages per topic, frames, (first, last) stamp s)."""
    ts = typestore()
    counts: dict[str, int] = {}
    n_frames, first_ns, last_ns = 0, None, None
    total = len(frames) if isinstance(frames, Sequence) else None
    with Writer(path, version=BAG_VERSION, storage_plugin=plugin) as writer:
        conns: dict[str, Connection] = {}

        def write(topic: str, msgtype: str, msg, stamp_ns: int, qos: Sequence[Qos] = ()) -> None:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts, offered_qos_profiles=qos)
            writer.write(conns[topic], stamp_ns, ts.serialize_cdr(msg, msgtype))
            counts[topic] = counts.get(topic, 0) + 1

        for frame in tqdm(frames, total=total, disable=not progress, unit="frame", desc=f"writing {path.name}"):
            what = f"frame {n_frames} ({frame.name!r})"
            ns = _stamp_ns(frame.stamp, what)
            if last_ns is not None and ns <= last_ns:
                raise ValueError(f"{what}: stamp {frame.stamp:.9f} s is not after the previous frame's "
                                 f"{last_ns * 1e-9:.9f} s; re-stamp the frames (e.g. aceg-make-bag --rate)")
            first_ns = ns if first_ns is None else first_ns
            last_ns = ns

            # camera_info first, so a reader in bag order always has it for the image.
            write(camera_info_topic, CAMERA_INFO, _camera_info_msg(ns, camera_frame, frame.intrinsics), ns)
            header = _header(ns, camera_frame)
            if compression is not None:
                fmt, data = encode_compressed(frame.image, compression, jpeg_quality)
                msg = ts.types[COMPRESSED_IMAGE](header=header, format=fmt, data=np.frombuffer(data, np.uint8))
                write(image_topic, COMPRESSED_IMAGE, msg, ns)
            else:
                encoding = "mono8" if frame.image.ndim == 2 else "rgb8"
                height, width, step, data = encode_image(frame.image, encoding)
                msg = ts.types[IMAGE](header=header, height=height, width=width, encoding=encoding,
                                      is_bigendian=0, step=step, data=np.frombuffer(data, np.uint8))
                write(image_topic, IMAGE, msg, ns)

            T_map_cam = frame.T_world_cam
            if pose_topic is not None:
                msg = ts.types[POSE_STAMPED](header=_header(ns, map_frame), pose=_pose_msg(T_map_cam))
                write(pose_topic, POSE_STAMPED, msg, ns)
            if tf:
                if odom_frame is None:
                    transforms = [_transform_msg(ns, map_frame, camera_frame, T_map_cam)]
                else:
                    transforms = [_transform_msg(ns, odom_frame, camera_frame, invert(T_map_odom) @ T_map_cam)]
                    map_odom = _transform_msg(ns, map_frame, odom_frame, T_map_odom)
                    if not odom_static:
                        transforms.insert(0, map_odom)
                    elif n_frames == 0:
                        write(tf_static_topic, TF_MESSAGE, ts.types[TF_MESSAGE](transforms=[map_odom]), ns,
                              qos=[_LATCHED_QOS])
                write(tf_topic, TF_MESSAGE, ts.types[TF_MESSAGE](transforms=transforms), ns)
            n_frames += 1
    if n_frames == 0:
        raise ValueError(f"no frames to write to {path.name}")
    return counts, n_frames, (first_ns * 1e-9, last_ns * 1e-9)


# --- opening and inspecting bags ---------------------------------------------------------------


@contextmanager
def open_bag(bag: Path) -> Iterator[Reader]:
    """An open rosbags Reader, or ``ValueError`` saying why ``bag`` cannot be read."""
    bag = Path(bag)
    if not bag.exists():
        raise ValueError(f"bag {bag} does not exist")
    try:
        reader = Reader(bag)
        reader.open()
    except Exception as exc:  # rosbags raises ReaderError, YAML, sqlite or KeyError for non-bags
        raise ValueError(f"{bag} is not a readable rosbag2 bag (a folder with metadata.yaml, "
                         f"or a .mcap / .db3 file): {exc}") from exc
    try:
        yield reader
    finally:
        reader.close()


def topic_list(reader: Reader) -> str:
    """The bag's topics and their types, for error messages."""
    topics = reader.topics
    if not topics:
        return "(none)"
    return ", ".join(f"{name} ({info.msgtype}, {info.msgcount} msgs)" for name, info in sorted(topics.items()))


def bag_info(path: Path) -> dict:
    """Topics, types and message counts of a bag.

    Returns ``{"path", "messages", "start_s", "duration_s", "topics": {name: {"type", "count"}}}``
    (seconds; ``start_s`` is the first message's receive time).
    """
    with open_bag(path) as reader:
        return {
            "path": str(path),
            "messages": int(reader.message_count),
            "start_s": reader.start_time * 1e-9 if reader.message_count else 0.0,
            "duration_s": reader.duration * 1e-9 if reader.message_count else 0.0,
            "topics": {name: {"type": info.msgtype, "count": int(info.msgcount)}
                       for name, info in sorted(reader.topics.items())},
        }


def topic_connections(reader: Reader, bag: Path, topic: str, allowed: Sequence[str], what: str) -> list[Connection]:
    """The connections of ``topic``, checked to exist and to carry one of the ``allowed`` types."""
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        raise ValueError(f"{what} topic {topic!r} is not in bag {bag}; topics found: {topic_list(reader)}")
    bad = sorted({c.msgtype for c in conns} - set(allowed))
    if bad:
        raise ValueError(f"{what} topic {topic!r} in bag {bag} has type {', '.join(bad)}; "
                         f"expected {' or '.join(allowed)}")
    if sum(c.msgcount for c in conns) == 0:
        raise ValueError(f"{what} topic {topic!r} in bag {bag} has no messages")
    return conns


def deserialize(raw: bytes, conn: Connection, bag: Path):
    """One message of ``conn`` from its CDR bytes, or ``ValueError`` naming the bag, topic and type."""
    try:
        return typestore().deserialize_cdr(raw, conn.msgtype)
    except Exception as exc:  # corrupt CDR surfaces as struct/index/assertion errors
        raise ValueError(f"{bag}: could not deserialize a {conn.msgtype} message on {conn.topic}: {exc}") from exc


# --- pose sources ------------------------------------------------------------------------------


class PoseTrack:
    """Poses ``T_parent_child`` sampled at stamps (seconds), interpolated on demand.

    Samples are sorted by stamp; of samples sharing a stamp the last one added wins.
    """

    def __init__(self, stamps: Sequence[float], poses: Sequence[np.ndarray]) -> None:
        stamps_N = np.asarray(stamps, dtype=np.float64).reshape(-1)
        poses_N44 = np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4)
        order = np.argsort(stamps_N, kind="stable")
        stamps_N, poses_N44 = stamps_N[order], poses_N44[order]
        keep = np.append(np.diff(stamps_N) > 0, True)  # last of each run of equal stamps
        self.stamps, self.poses = stamps_N[keep], poses_N44[keep]

    def __len__(self) -> int:
        return len(self.stamps)

    def at(self, stamp: float, max_gap: float) -> np.ndarray | None:
        """The pose at ``stamp`` (linear translation, slerp rotation), or None when no
        sample lies within ``max_gap`` seconds (see :func:`aceg_model.geometry.interpolate_poses`)."""
        # Only the two bracketing samples matter: interpolate on that window, O(log N) per query.
        j = int(np.searchsorted(self.stamps, stamp))
        lo, hi = max(j - 1, 0), min(j + 1, len(self.stamps))
        poses, valid = interpolate_poses(self.stamps[lo:hi], self.poses[lo:hi], np.array([stamp]), max_gap)
        return poses[0] if valid[0] else None


def _frame_id(name: str) -> str:
    """TF frame ids without the leading '/' of ROS 1 names, as tf2 treats them."""
    return name.lstrip("/")


class TfTree:
    """A TF tree from a bag: static edges are constant, dynamic edges are :class:`PoseTrack`s."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._static: dict[str, np.ndarray] = {}  # child -> T_parent_child
        self._samples: dict[str, tuple[list[float], list[np.ndarray]]] = {}
        self._tracks: dict[str, PoseTrack] = {}

    def add(self, parent: str, child: str, stamp: float, T_parent_child: np.ndarray, static: bool) -> None:
        """Add one transform; a frame keeps one parent, and an edge is either static or dynamic."""
        parent, child = _frame_id(parent), _frame_id(child)
        known = self._parent.get(child)
        if known is not None and known != parent:
            raise ValueError(f"TF frame {child!r} has two parents, {known!r} and {parent!r}; "
                             "a TF tree gives every frame exactly one parent")
        if (child in self._samples) if static else (child in self._static):
            raise ValueError(f"TF edge {parent!r} -> {child!r} is on both /tf and /tf_static")
        self._parent[child] = parent
        if static:
            self._static[child] = T_parent_child
        else:
            stamps, poses = self._samples.setdefault(child, ([], []))
            stamps.append(stamp)
            poses.append(T_parent_child)
            self._tracks.pop(child, None)

    @property
    def frames(self) -> set[str]:
        return set(self._parent) | set(self._parent.values())

    def _up(self, frame: str) -> list[str]:
        """``frame`` and its ancestors up to the root."""
        path = [frame]
        while path[-1] in self._parent:
            path.append(self._parent[path[-1]])
            if len(path) > len(self._parent) + 1:
                raise ValueError(f"TF tree has a cycle through {path[-1]!r}")
        return path

    def _chains(self, target: str, source: str) -> tuple[list[str], list[str]]:
        """Frames below the lowest common ancestor on the way up from ``source`` and from ``target``."""
        target, source = _frame_id(target), _frame_id(source)
        for frame in (target, source):
            if frame not in self.frames:
                raise ValueError(f"frame {frame!r} is not in the bag's TF tree; frames found: "
                                 f"{', '.join(sorted(self.frames)) or '(none)'}")
        up_source, up_target = self._up(source), self._up(target)
        common = next((f for f in up_source if f in set(up_target)), None)
        if common is None:
            raise ValueError(f"no TF path between {target!r} and {source!r}: {source!r} hangs below root "
                             f"{up_source[-1]!r}, {target!r} below root {up_target[-1]!r}")
        return up_source[: up_source.index(common)], up_target[: up_target.index(common)]

    def describe(self, target: str, source: str) -> str:
        """The chain as text, e.g. ``map -> odom (static) -> camera (dynamic)``."""
        up_source, up_target = self._chains(target, source)

        def kind(child: str) -> str:
            return "static" if child in self._static else "dynamic"

        # Up from the target to the common ancestor (edges taken inverted), then down to the source.
        parts = [target] + [f"{self._parent[c]} (inverse {kind(c)})" for c in up_target]
        parts += [f"{c} ({kind(c)})" for c in reversed(up_source)]
        return " -> ".join(parts)

    def _edge(self, child: str, stamp: float, max_gap: float) -> np.ndarray | None:
        if child in self._static:
            return self._static[child]
        if child not in self._tracks:
            self._tracks[child] = PoseTrack(*self._samples[child])
        return self._tracks[child].at(stamp, max_gap)

    def lookup(self, target: str, source: str, stamp: float, max_gap: float) -> np.ndarray | None:
        """``T_target_source`` at ``stamp``: maps points from ``source`` to ``target``.

        None when a dynamic edge of the chain has no sample within ``max_gap`` seconds.
        """
        up_source, up_target = self._chains(target, source)
        T_common = {}
        for name, chain in (("source", up_source), ("target", up_target)):
            # Compose child-to-parent edges upward: T_common_frame = T_common_p1 @ ... @ T_pk_frame.
            T = np.eye(4)
            for child in chain:
                T_edge = self._edge(child, stamp, max_gap)
                if T_edge is None:
                    return None
                T = T_edge @ T
            T_common[name] = T
        return invert(T_common["target"]) @ T_common["source"]


def read_pose_track(reader: Reader, conns: list[Connection], bag: Path) -> tuple[PoseTrack, str]:
    """(track of ``T_frame_pose``, the messages' header.frame_id) from a pose topic of any POSE_TYPES."""
    stamps, poses, frame_ids = [], [], set()
    for conn, _, raw in reader.messages(conns):
        msg = deserialize(raw, conn, bag)
        # PoseStamped holds a Pose; PoseWithCovarianceStamped and Odometry a PoseWithCovariance.
        pose = msg.pose if conn.msgtype == POSE_STAMPED else msg.pose.pose
        stamps.append(_header_ns(msg.header) * 1e-9)
        poses.append(_pose_from_msg(pose))
        frame_ids.add(msg.header.frame_id)
    return PoseTrack(stamps, poses), ", ".join(sorted(frame_ids))


def read_tf_tree(reader: Reader, conns: list[Connection], static_topic: str, bag: Path) -> TfTree:
    """Every transform on the TF topics ``conns``; those on ``static_topic`` hold for all time."""
    tree = TfTree()
    for conn, _, raw in reader.messages(conns):
        msg = deserialize(raw, conn, bag)
        for tf in msg.transforms:
            tree.add(tf.header.frame_id, tf.child_frame_id, _header_ns(tf.header) * 1e-9,
                     _pose_from_msg(tf.transform), static=conn.topic == static_topic)
    return tree


# --- cameras -----------------------------------------------------------------------------------


def _calibration(info, topic: str, undistort: bool) -> tuple[np.ndarray, np.ndarray]:
    """(K, distortion) of a CameraInfo, or ``ValueError`` if it cannot give posed frames."""
    K = np.asarray(info.k, dtype=np.float64).reshape(3, 3)
    d = np.asarray(info.d, dtype=np.float64)
    if not np.any(K):
        raise ValueError(f"camera_info on {topic} is uncalibrated (K is all zero)")
    if np.any(d != 0):
        if not undistort:
            raise ValueError(f"camera_info on {topic} has non-zero distortion ({info.distortion_model}, "
                             f"d={np.round(d, 6).tolist()}); frames must be undistorted: pass "
                             "undistort=True to undistort images with OpenCV")
        if info.distortion_model not in UNDISTORT_MODELS:
            raise ValueError(f"cannot undistort distortion model {info.distortion_model!r} on {topic}; "
                             f"supported: {', '.join(UNDISTORT_MODELS)}")
    return K, d


class _Camera:
    """Intrinsics (and undistortion maps) from one CameraInfo for images of one size.

    Unlike ``aceg_model.lens.ImageUndistorter`` (the node's and the localizer's, which keeps K
    and repeats the edge), this undistorts to a new K cropped to the valid pixels: posed frames
    carry their own intrinsics into mapping, so a tighter K costs nothing and no border is left."""

    def __init__(self, info, topic: str, width: int, height: int, undistort: bool) -> None:
        K, d = _calibration(info, topic, undistort)
        # width/height 0 means "not set" in some drivers' CameraInfo.
        if (info.width, info.height) != (0, 0) and (info.width, info.height) != (width, height):
            raise ValueError(f"camera_info on {topic} is for {info.width}x{info.height} px images, "
                             f"the images are {width}x{height} px")
        self.maps = None
        if np.any(d != 0):
            # alpha=0: crop to valid pixels so no black border reaches the regressor.
            K_new, _ = cv2.getOptimalNewCameraMatrix(K, d, (width, height), 0)
            self.maps = cv2.initUndistortRectifyMap(K, d, None, K_new, (width, height), cv2.CV_32FC1)
            K = K_new
        self.intrinsics = Intrinsics.from_K(K, width, height)

    @staticmethod
    def key(info, width: int, height: int) -> tuple:
        """What the camera depends on: a new key means a new calibration or image size."""
        return (np.asarray(info.k).tobytes(), np.asarray(info.d).tobytes(), info.distortion_model,
                info.width, info.height, width, height)

    def apply(self, image: np.ndarray) -> np.ndarray:
        if self.maps is None:
            return image
        return cv2.remap(image, *self.maps, interpolation=cv2.INTER_LINEAR)


def _decode_image_msg(msg, conn: Connection, bag: Path, stamp_s: float) -> np.ndarray:
    where = f"{bag}: image on {conn.topic} at {stamp_s:.9f} s"
    try:
        if conn.msgtype == COMPRESSED_IMAGE:
            image = decode_compressed(msg.format, msg.data)
        else:
            image = decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data, bool(msg.is_bigendian))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if conn.msgtype == IMAGE and msg.encoding == "mono16":
        # A 16-bit intensity camera: keep the top 8 bits, as the localization node does.
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        kind = msg.encoding if conn.msgtype == IMAGE else f"{image.dtype} {msg.format!r}"
        raise ValueError(f"{where}: {kind} images (depth?) cannot be posed frames; "
                         "need colour (rgb8, bgr8, ...), mono8 or mono16")
    return image


# --- reading -----------------------------------------------------------------------------------


@dataclass
class BagReadReport:
    """What :func:`read_bag_frames` kept and dropped, and where the poses came from."""

    bag: Path
    image_topic: str
    pose_source: str = ""
    pose_samples: int = 0
    max_pose_gap_s: float = DEFAULT_MAX_POSE_GAP_S
    images: int = 0
    frames: int = 0
    dropped_before_camera_info: int = 0
    dropped_no_pose: int = 0
    undistorted: bool = False
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.frames} of {self.images} images on {self.image_topic} kept; dropped "
                f"{self.dropped_no_pose} with no pose within {self.max_pose_gap_s * 1e3:.0f} ms and "
                f"{self.dropped_before_camera_info} before the first camera_info; poses from {self.pose_source} "
                f"({self.pose_samples} samples)" + "".join(f"; {note}" for note in self.notes))


def iter_bag_frames(
    bag: Path,
    image_topic: str = DEFAULT_IMAGE_TOPIC,
    camera_info_topic: str = DEFAULT_CAMERA_INFO_TOPIC,
    pose_topic: str | None = None,
    tf_parent: str = DEFAULT_MAP_FRAME,
    tf_child: str | None = None,
    max_pose_gap: float = DEFAULT_MAX_POSE_GAP_S,
    *,
    undistort: bool = False,
    max_frames: int | None = None,
    tf_topic: str = DEFAULT_TF_TOPIC,
    tf_static_topic: str = DEFAULT_TF_STATIC_TOPIC,
    progress: bool = False,
) -> tuple[Iterator[Frame], BagReadReport]:
    """Posed frames from a bag, streamed: ``(frames iterator, report filled as it runs)``.

    Topics, types, the pose source and the camera calibration are checked (and
    poses loaded) before this returns, so bad input raises ``ValueError`` here;
    images are decoded one at a time as the iterator is consumed. See
    :func:`read_bag_frames` for the arguments.
    """
    bag = Path(bag)
    if max_pose_gap < 0:
        raise ValueError(f"max_pose_gap must be >= 0 s, got {max_pose_gap}")
    with open_bag(bag) as reader:
        if reader.message_count == 0:
            raise ValueError(f"bag {bag} is empty (no messages)")
        image_conns = topic_connections(reader, bag, image_topic, IMAGE_TYPES, "image")
        info_conns = topic_connections(reader, bag, camera_info_topic, (CAMERA_INFO,), "camera_info")
        report = BagReadReport(bag, image_topic, max_pose_gap_s=max_pose_gap)
        # Fail early on a calibration we cannot use, not after reading half the bag.
        info_conn, first_info_ns, raw = next(reader.messages(info_conns))
        first_info = deserialize(raw, info_conn, bag)
        report.undistorted = bool(np.any(_calibration(first_info, camera_info_topic, undistort)[1] != 0))

        pose_at: Callable[[float], np.ndarray | None]
        if pose_topic is not None:
            pose_conns = topic_connections(reader, bag, pose_topic, POSE_TYPES, "pose")
            track, frame_id = read_pose_track(reader, pose_conns, bag)
            report.pose_source = f"{pose_topic} ({pose_conns[0].msgtype}, frame {frame_id!r})"
            report.pose_samples = len(track)
            if frame_id != tf_parent:
                report.notes.append(f"poses on {pose_topic} are in frame {frame_id!r}, not {tf_parent!r}")

            def pose_at(stamp: float) -> np.ndarray | None:
                return track.at(stamp, max_pose_gap)
        else:
            tf_topics = (tf_topic, tf_static_topic)
            tf_conns = [c for c in reader.connections if c.topic in tf_topics]
            if not tf_conns:
                raise ValueError(f"no pose_topic given and bag {bag} has no {tf_topic} or {tf_static_topic} "
                                 f"to take poses from; topics found: {topic_list(reader)}")
            for topic in {c.topic for c in tf_conns}:
                topic_connections(reader, bag, topic, (TF_MESSAGE,), "TF")
            tree = read_tf_tree(reader, tf_conns, tf_static_topic, bag)
            if tf_child is None:
                first_image = deserialize(next(reader.messages(image_conns))[2], image_conns[0], bag)
                tf_child = first_image.header.frame_id
                if not tf_child:
                    raise ValueError(f"images on {image_topic} have an empty header.frame_id; pass tf_child")
            report.pose_source = f"TF {tf_parent} -> {tf_child}: {tree.describe(tf_parent, tf_child)}"
            report.pose_samples = sum(c.msgcount for c in tf_conns)
            child = tf_child

            def pose_at(stamp: float) -> np.ndarray | None:
                return tree.lookup(tf_parent, child, stamp, max_pose_gap)

        n_images = sum(c.msgcount for c in image_conns)
    frames = _generate_frames(bag, image_topic, camera_info_topic, (first_info_ns, first_info), pose_at, report,
                              undistort, max_frames, n_images if progress else None)
    return frames, report


def _generate_frames(bag: Path, image_topic: str, camera_info_topic: str, first_info: tuple[int, object],
                     pose_at: Callable[[float], np.ndarray | None], report: BagReadReport, undistort: bool,
                     max_frames: int | None, progress_total: int | None) -> Iterator[Frame]:
    info, camera, camera_key = None, None, None
    bar = tqdm(total=progress_total, disable=progress_total is None, unit="image", desc=f"reading {bag.name}")
    with open_bag(bag) as reader, bar:
        conns = [c for c in reader.connections if c.topic in (image_topic, camera_info_topic)]
        # Bag order, as a live subscriber would see it: an image needs a camera_info before it.
        for conn, received_ns, raw in reader.messages(conns):
            msg = deserialize(raw, conn, bag)
            if conn.topic == camera_info_topic:
                info = msg
                continue
            report.images += 1
            bar.update()
            if info is None:
                # Storage order of messages with equal receive times is arbitrary: an image
                # received together with the first camera_info takes it.
                if received_ns < first_info[0]:
                    report.dropped_before_camera_info += 1
                    continue
                info = first_info[1]
            stamp_ns = _header_ns(msg.header)
            stamp = stamp_ns * 1e-9
            T_map_cam = pose_at(stamp)
            if T_map_cam is None:
                report.dropped_no_pose += 1
                continue
            image = _decode_image_msg(msg, conn, bag, stamp)
            height, width = image.shape[:2]
            key = _Camera.key(info, width, height)
            if camera is None or key != camera_key:
                camera, camera_key = _Camera(info, camera_info_topic, width, height, undistort), key
            frame = Frame(camera.apply(image), camera.intrinsics, T_map_cam, stamp=stamp,
                          name=f"{image_topic}@{stamp_ns}", meta={"bag": str(bag), "stamp_ns": stamp_ns})
            report.frames += 1  # before yielding: the report is current while the caller holds the frame
            yield frame
            if max_frames is not None and report.frames >= max_frames:
                return


def read_bag_frames(
    bag: Path,
    image_topic: str = DEFAULT_IMAGE_TOPIC,
    camera_info_topic: str = DEFAULT_CAMERA_INFO_TOPIC,
    pose_topic: str | None = None,
    tf_parent: str = DEFAULT_MAP_FRAME,
    tf_child: str | None = None,
    max_pose_gap: float = DEFAULT_MAX_POSE_GAP_S,
    *,
    undistort: bool = False,
    max_frames: int | None = None,
    tf_topic: str = DEFAULT_TF_TOPIC,
    tf_static_topic: str = DEFAULT_TF_STATIC_TOPIC,
    progress: bool = False,
) -> tuple[list[Frame], BagReadReport]:
    """Read posed frames from a bag: ``(frames, report)``.

    Args:
        bag: a rosbag2 bag folder, or a single ``.mcap`` / ``.db3`` file.
        image_topic: sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, 8UC1, 8UC3; mono16 is
            cut to its top 8 bits) or sensor_msgs/CompressedImage (jpeg, png). Colour becomes
            RGB uint8, grey stays HxW uint8.
        camera_info_topic: sensor_msgs/CameraInfo; each image takes the latest one before it
            (images before the first are dropped and counted). Intrinsics are K
            (``fx=k[0], fy=k[4], cx=k[2], cy=k[5]``).
        pose_topic: PoseStamped, PoseWithCovarianceStamped or nav_msgs/Odometry giving the
            camera-to-map pose ``T_map_cam`` (the type is read from the bag). None: take
            ``T_tf_parent_tf_child`` from the bag's /tf and /tf_static instead.
        tf_parent, tf_child: the TF frames (default child: the images' header.frame_id).
            Static edges are constant; dynamic edges are interpolated at each image stamp.
        max_pose_gap: seconds; an image is kept only if its pose (every dynamic TF edge)
            has samples within this gap around its stamp (linear translation, slerp rotation).
        undistort: undistort images whose CameraInfo has non-zero distortion (plumb_bob or
            rational_polynomial) with OpenCV, using the new K; otherwise such a bag is refused.
        max_frames: stop after this many kept frames.

    ``Frame.stamp`` is the image header stamp in seconds, ``Frame.name`` ``<topic>@<ns>``.
    Raises ``ValueError`` for a missing or unreadable bag, an empty bag, a missing topic
    (naming the topics found), a wrong message type, corrupt images or unknown encodings.
    """
    frames, report = iter_bag_frames(bag, image_topic, camera_info_topic, pose_topic, tf_parent, tf_child,
                                     max_pose_gap, undistort=undistort, max_frames=max_frames, tf_topic=tf_topic,
                                     tf_static_topic=tf_static_topic, progress=progress)
    return list(frames), report
