"""``aceg-replay``: play a query bag through the localizer and measure it against the bag's ground truth.

    aceg-replay --bag query_bag --map scene.map.safetensors --json out/replay.json --report-dir out/replay
    aceg-replay --bag query_bag --map scene.map.safetensors --offline --json out/offline.json
    aceg-replay --bag query_bag --external-node --json out/replay.json     # a node you started yourself

Two modes, one report (``aceg_ros.report``):

- **DDS** (default): the real ``aceg_localizer`` node (``aceg_ros.localizer_node``)
  runs in this process on a multi-threaded executor, configured and activated
  with ``--map`` / ``--model`` / ``--param``; a player node publishes the bag's
  ``camera_info`` and images, as stored (the bag's CDR bytes, header stamps
  untouched), on the node's ``image`` (or ``image/compressed``) and
  ``camera_info`` topics, and records every pose the node publishes on ``pose``.
  With ``--external-node`` nothing is started: the player talks to a running
  node in ``--namespace``.
- **offline** (``--offline``): no DDS, no node; the same bag messages go through
  the node's own conversion code (``aceg_ros.ros_conversions``: decoding, camera
  checks, undistortion) into ``aceg_model.localizer.Localizer`` with the same
  PnP parameters. It differs from DDS mode only in transport and threading, so
  both give the same poses on the same bag (``test/test_replay.py`` checks it).

Pacing (``--rate``, DDS mode): ``max`` sends an image once the node has answered
the previous one (a pose, or its ``/diagnostics`` counters say the frame was
processed without one) or after ``--timeout``; ``recorded`` sends at the bag's
image stamps' spacing; a number is a speed factor on that (2 = twice as fast).
At ``recorded`` or a factor the node's newest-frame-only queue drops frames it
cannot keep up with: they count as failures, as they would on a robot.

Clock: poses are matched to ground truth by the image header stamp (bag time),
which the node copies into every pose it publishes, so matching never depends
on a clock. The in-process node runs with ``use_sim_time`` false; its clock
(wall time) is used only for diagnostics stamps and the map->odom re-send
timer, never for poses. ``--clock`` publishes ``/clock`` at each image's bag
stamp just before the image and starts the node with ``use_sim_time`` true, as
``ros2 bag play --clock`` would. Wall-clock pacing (``--rate``) and latency use
the monotonic clock of this process.

Ground truth (``--gt-topic``): ``auto`` takes the one pose topic
(PoseStamped, PoseWithCovarianceStamped, Odometry) whose frame is
``--gt-parent``, else the ``/tf`` (+ ``/tf_static``) chain from ``--gt-parent``
to the images' frame, else none; ``none`` replays without ground truth (poses
are reported, accuracy is not); a topic name uses that topic (``/tf`` for the TF
chain). Ground truth is interpolated to each image stamp (samples within
``--max-gt-gap``). The map must be in the same frame as the ground truth (a
map made from a bag of the same session is).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from aceg_model.lens import ImageUndistorter
from aceg_ros import bag_io
from aceg_ros.report import FrameResult, one_line, summarize, write_json, write_report

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"
DEFAULT_NAMESPACE = "/aceg"
NODE_NAME = "aceg_localizer"
RATE_HELP = "max | recorded | FACTOR"
DISCOVERY_TIMEOUT_S = 15.0  # for the player and the node to see each other
DIAG_PERIOD_S = 0.1  # diagnostics period of the in-process node: how soon a refused frame is known
INFO_LEAD_S = 0.002  # camera_info goes out this long before its image, so the node has it first


# --- reading a query bag -----------------------------------------------------------------------


@dataclass
class BagMessage:
    """One image or camera_info message of a query bag, as stored (CDR bytes) and deserialized (rosbags)."""

    kind: str  # "image" or "info"
    msgtype: str
    raw: bytes
    msg: Any  # the rosbags message (attribute names as the ROS message)
    stamp_ns: int  # header stamp


@dataclass
class QueryBag:
    """A bag to replay: its image and camera_info topics and a ground-truth pose source (or none)."""

    path: Path
    image_topic: str
    image_type: str
    camera_info_topic: str
    n_images: int
    gt_source: str  # description; "" = no ground truth
    notes: list[str] = field(default_factory=list)
    _gt_at: Callable[[float], np.ndarray | None] | None = None

    @property
    def compressed(self) -> bool:
        return self.image_type == bag_io.COMPRESSED_IMAGE

    def gt_at(self, stamp_ns: int) -> np.ndarray | None:
        """Ground-truth ``T_map_cam`` at an image stamp, or None (no ground truth, or none near it)."""
        return None if self._gt_at is None else self._gt_at(stamp_ns * 1e-9)

    def messages(self) -> Iterator[BagMessage]:
        """The camera_info and image messages in bag order, streamed (one image in memory at a time)."""
        with bag_io.open_bag(self.path) as reader:
            conns = [c for c in reader.connections if c.topic in (self.image_topic, self.camera_info_topic)]
            for conn, _, raw in reader.messages(conns):
                msg = bag_io.deserialize(raw, conn, self.path)
                kind = "image" if conn.topic == self.image_topic else "info"
                stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
                yield BagMessage(kind, conn.msgtype, bytes(raw), msg, stamp)


def _pick_topic(reader, bag: Path, topic: str, types: tuple[str, ...], what: str) -> str:
    """``topic`` itself, or for 'auto' the one topic of the right type (else a ValueError naming the candidates)."""
    if topic != "auto":
        bag_io.topic_connections(reader, bag, topic, types, what)  # exists, right type, not empty
        return topic
    found = sorted({c.topic for c in reader.connections if c.msgtype in types})
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"bag {bag} has no {what} topic ({' or '.join(types)}); "
                         f"topics found: {bag_io.topic_list(reader)}")
    raise ValueError(f"bag {bag} has several {what} topics ({', '.join(found)}); choose one with "
                     f"--{what.replace('_', '-')}-topic")


def open_query_bag(bag: Path, image_topic: str = "auto", camera_info_topic: str = "auto", gt_topic: str = "auto",
                   gt_parent: str = bag_io.DEFAULT_MAP_FRAME, gt_child: str | None = None,
                   max_gt_gap: float = bag_io.DEFAULT_MAX_POSE_GAP_S) -> QueryBag:
    """Check a query bag and load its ground truth; ``ValueError`` (naming the topics found) when unusable.

    ``image_topic`` / ``camera_info_topic``: 'auto' = the bag's only topic of that type.
    ``gt_topic``: 'auto', 'none', a pose topic, or '/tf' (see the module docstring).
    """
    bag = Path(bag)
    if max_gt_gap < 0:
        raise ValueError(f"max_gt_gap must be >= 0 s, got {max_gt_gap}")
    with bag_io.open_bag(bag) as reader:
        if reader.message_count == 0:
            raise ValueError(f"bag {bag} is empty (no messages)")
        image_topic = _pick_topic(reader, bag, image_topic, bag_io.IMAGE_TYPES, "image")
        camera_info_topic = _pick_topic(reader, bag, camera_info_topic, (bag_io.CAMERA_INFO,), "camera_info")
        image_conns = [c for c in reader.connections if c.topic == image_topic]
        image_type = image_conns[0].msgtype
        qbag = QueryBag(bag, image_topic, image_type, camera_info_topic, sum(c.msgcount for c in image_conns), "")
        if gt_topic != "none":
            _load_ground_truth(reader, qbag, gt_topic, gt_parent, gt_child, max_gt_gap)
    return qbag


def _load_ground_truth(reader, qbag: QueryBag, gt_topic: str, parent: str, child: str | None, max_gap: float) -> None:
    bag = qbag.path
    tf_topics = (bag_io.DEFAULT_TF_TOPIC, bag_io.DEFAULT_TF_STATIC_TOPIC)
    if gt_topic not in ("auto", *tf_topics):
        conns = bag_io.topic_connections(reader, bag, gt_topic, bag_io.POSE_TYPES, "ground-truth pose")
        track, frame_id = bag_io.read_pose_track(reader, conns, bag)
        if frame_id != parent:
            qbag.notes.append(f"ground truth on {gt_topic} is in frame {frame_id!r}, not {parent!r}")
        qbag.gt_source = f"{gt_topic} ({conns[0].msgtype}, frame {frame_id!r}, {len(track)} samples)"
        qbag._gt_at = lambda s: track.at(s, max_gap)
        return
    if gt_topic == "auto":
        # A pose topic in the map frame (an Odometry in 'odom' is odometry, not ground truth).
        candidates = []
        for topic in sorted({c.topic for c in reader.connections if c.msgtype in bag_io.POSE_TYPES}):
            conns = [c for c in reader.connections if c.topic == topic]
            track, frame_id = bag_io.read_pose_track(reader, conns, bag)
            if frame_id == parent and len(track):
                candidates.append((topic, conns[0].msgtype, track))
            else:
                qbag.notes.append(f"{topic} not used as ground truth: frame {frame_id!r}, not {parent!r}")
        if len(candidates) > 1:
            raise ValueError(f"bag {bag} has several pose topics in frame {parent!r} "
                             f"({', '.join(c[0] for c in candidates)}); choose one with --gt-topic")
        if candidates:
            topic, msgtype, track = candidates[0]
            qbag.gt_source = f"{topic} ({msgtype}, frame {parent!r}, {len(track)} samples)"
            qbag._gt_at = lambda s: track.at(s, max_gap)
            return
    tf_conns = [c for c in reader.connections if c.topic in tf_topics and c.msgtype == bag_io.TF_MESSAGE]
    if not tf_conns:
        if gt_topic == "auto":
            qbag.notes.append("no ground truth: no pose topic in frame "
                              f"{parent!r} and no /tf; topics found: {bag_io.topic_list(reader)}")
            return
        raise ValueError(f"no /tf or /tf_static in bag {bag} for ground truth; topics found: "
                         f"{bag_io.topic_list(reader)}")
    tree = bag_io.read_tf_tree(reader, tf_conns, bag_io.DEFAULT_TF_STATIC_TOPIC, bag)
    if child is None:
        first = next(reader.messages([c for c in reader.connections if c.topic == qbag.image_topic]))
        child = bag_io.deserialize(first[2], first[0], bag).header.frame_id
    try:
        chain = tree.describe(parent, child)
    except ValueError as e:
        if gt_topic == "auto":
            qbag.notes.append(f"no ground truth from /tf: {e}")
            return
        raise
    qbag.gt_source = f"TF {chain}"
    qbag._gt_at = lambda s: tree.lookup(parent, child, s, max_gap)


# --- offline mode ------------------------------------------------------------------------------


def replay_offline(qbag: QueryBag, localizer, values: dict[str, Any] | None = None,
                   progress: bool = True) -> tuple[list[FrameResult], float]:
    """Localize every image of ``qbag`` with ``localizer`` directly; (results, wall seconds).

    Each image goes through what the node does with it (``AcegLocalizer._process``):
    decode, camera_info checks, size check, undistortion, ``localize``. ``values``:
    node parameter values (``undistort``, ``image_is_rectified``); latency is the
    time from the raw message to the result, as the node's ``node_total``.
    """
    from aceg_ros import params as P
    from aceg_ros import ros_conversions as rc

    v = {s.name: s.default for s in P.PARAMETERS} | (values or {})
    undistorter = ImageUndistorter()
    camera, camera_error = None, "no camera_info before this image"
    results: list[FrameResult] = []
    bar = tqdm(total=qbag.n_images, desc=f"offline {qbag.path.name}", unit="frame", disable=not progress)
    t_start = time.perf_counter()
    with bar:
        for m in qbag.messages():
            if m.kind == "info":  # the latest camera_info applies to the images after it, as in the node
                try:
                    camera, camera_error = rc.camera_model_from_info(m.msg, v["image_is_rectified"]), ""
                except ValueError as e:
                    camera, camera_error = None, f"bad camera_info: {e}"
                continue
            r = FrameResult(m.stamp_ns, qbag.gt_at(m.stamp_ns))
            t0 = time.perf_counter()
            r.reason = _localize_message(m, camera, camera_error, localizer, undistorter, v, r)
            if r.T_est is not None:
                r.latency_ms = (time.perf_counter() - t0) * 1e3
            results.append(r)
            bar.update()
    return results, time.perf_counter() - t_start


def _localize_message(m: BagMessage, camera, camera_error: str, localizer, undistorter, v: dict,
                      r: FrameResult) -> str | None:
    """The node's per-frame path; fills ``r`` and returns why there is no pose (None when localized)."""
    from aceg_ros import ros_conversions as rc

    try:
        image = rc.compressed_to_array(m.msg) if m.msgtype == bag_io.COMPRESSED_IMAGE else rc.image_to_array(m.msg)
    except ValueError as e:
        return f"bad_image: {e}"
    if camera is None:
        return f"no_camera_info: {camera_error}"
    h, w = image.shape[:2]
    K = camera.intrinsics
    if (w, h) != (K.width, K.height):
        return f"size_mismatch: image is {w}x{h} px, camera_info is {K.width}x{K.height} px"
    if camera.distorted:
        if not v["undistort"]:
            return f"distorted: camera_info has {camera.distortion_model} distortion and undistort is false"
        try:
            image = undistorter(image, K, camera.D, camera.fisheye)
        except Exception as e:  # noqa: BLE001 - as the node: ValueError or cv2.error makes the frame unusable
            return f"distorted: cannot undistort: {e}"
    res = localizer.localize(image, K)
    r.n_inliers = int(res.n_inliers)
    if not res.success:
        return f"not_localized: {res.reason}"
    r.T_est, r.covariance_66 = res.T_world_cam, res.covariance_66
    return None


# --- DDS mode ----------------------------------------------------------------------------------


def parse_rate(text: str) -> str | float:
    """'max', 'recorded' or a positive speed factor."""
    if text in ("max", "recorded"):
        return text
    try:
        factor = float(text)
    except ValueError:
        raise ValueError(f"--rate must be max, recorded or a positive number, got {text!r}") from None
    if not (factor > 0 and np.isfinite(factor)):
        raise ValueError(f"--rate factor must be > 0, got {text!r}")
    return factor


class ReplayPlayer:
    """A plain rclpy node that plays a query bag to an ``aceg_localizer`` and records the poses it publishes.

    Needs an executor spinning ``self.node`` (``LocalizerSession`` does it).
    """

    def __init__(self, context=None, namespace: str = DEFAULT_NAMESPACE, node_name: str = NODE_NAME,
                 clock: bool = False) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image

        ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
        self.namespace, self.diag_name = ns, f"{node_name}: localization"
        self.node = rclpy.create_node(f"aceg_replay_player_{id(self):x}", context=context)
        self._lock = threading.Lock()
        self._poses: dict[int, tuple[Any, float]] = {}  # stamp ns -> (msg, monotonic receipt time)
        self._diag: dict[str, int] | None = None
        self._diag_t = 0.0
        self._types = {bag_io.IMAGE: Image, bag_io.COMPRESSED_IMAGE: CompressedImage, bag_io.CAMERA_INFO: CameraInfo}
        # A camera driver's QoS (sensor data), as the node subscribes.
        self.pub_image = self.node.create_publisher(Image, f"{ns}/image", qos_profile_sensor_data)
        self.pub_compressed = self.node.create_publisher(CompressedImage, f"{ns}/image/compressed",
                                                         qos_profile_sensor_data)
        self.pub_info = self.node.create_publisher(CameraInfo, f"{ns}/camera_info", qos_profile_sensor_data)
        self.pub_clock = None
        if clock:
            from rosgraph_msgs.msg import Clock

            self.pub_clock = self.node.create_publisher(Clock, "/clock", 10)
        # Reliable like the node's latched pose, but volatile: never the pose latched by an earlier replay.
        pose_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.VOLATILE)
        self.node.create_subscription(PoseWithCovarianceStamped, f"{ns}/pose", self._on_pose, pose_qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)

    def _on_pose(self, msg) -> None:
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        with self._lock:
            self._poses.setdefault(stamp, (msg, time.monotonic()))

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name != self.diag_name:
                continue
            values = {kv.key: kv.value for kv in status.values}
            try:
                counts = {k: int(values[f"frames_{k}"]) for k in ("received", "processed", "dropped_newest_only")}
            except (KeyError, ValueError):
                continue
            with self._lock:
                # Counters only grow: keep the newest (a late, older message never goes back).
                if self._diag is None or counts["processed"] + counts["dropped_newest_only"] >= self._done(self._diag):
                    self._diag, self._diag_t = counts, time.monotonic()

    @staticmethod
    def _done(counts: dict[str, int]) -> int:
        return counts["processed"] + counts["dropped_newest_only"]

    def answered(self) -> int | None:
        """Frames the node has finished with (processed or dropped), from its diagnostics; None before any."""
        with self._lock:
            return None if self._diag is None else self._done(self._diag)

    def has_pose(self, stamp_ns: int) -> bool:
        with self._lock:
            return stamp_ns in self._poses

    def wait_for_node(self, compressed: bool, timeout_s: float = DISCOVERY_TIMEOUT_S) -> None:
        """Until the node subscribes to our image and camera_info topics and publishes ``pose``."""
        pub = self.pub_compressed if compressed else self.pub_image
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (pub.get_subscription_count() and self.pub_info.get_subscription_count()
                    and self.node.count_publishers(f"{self.namespace}/pose")):
                return
            time.sleep(0.05)
        raise RuntimeError(f"no active localizer found within {timeout_s:.0f} s: nothing subscribes to "
                           f"{pub.topic_name} and {self.pub_info.topic_name} or publishes {self.namespace}/pose "
                           "(is the node running, active, in that namespace and ROS_DOMAIN_ID, with image_transport "
                           f"{'compressed' if compressed else 'raw'}?)")

    def _wait_diag(self, timeout_s: float) -> int | None:
        t_asked = time.monotonic()
        while time.monotonic() - t_asked < timeout_s:
            with self._lock:
                if self._diag is not None and self._diag_t >= t_asked:
                    return self._done(self._diag)
            time.sleep(0.02)
        return self.answered()

    def play(self, qbag: QueryBag, rate: str | float = "max", timeout_s: float = 30.0,
             progress: bool = True) -> tuple[list[FrameResult], float]:
        """Publish the bag's camera_info and images to the node; (one result per image, wall seconds).

        See the module docstring for ``rate``. Poses are matched to images by stamp
        once everything is sent, so a late pose still counts; latency is from
        publishing the image to receiving its pose.
        """
        from rclpy.serialization import deserialize_message

        from aceg_ros import ros_conversions as rc

        log = self.node.get_logger()
        with self._lock:
            self._poses.clear()  # poses of an earlier play never match this one's images
        self.wait_for_node(qbag.compressed)
        # The node's counters before we start: a frame is answered when they pass base + its index.
        base = self._wait_diag(timeout_s=3.0)
        if base is None:
            log.warning("no diagnostics from the localizer: a frame without a pose is known only after "
                        f"--timeout {timeout_s:.0f} s")
        pub = self.pub_compressed if qbag.compressed else self.pub_image
        sent: list[tuple[int, float]] = []  # (stamp ns, monotonic send time)
        timeouts = 0
        first_stamp = t_start = None
        bar = tqdm(total=qbag.n_images, desc=f"replay {qbag.path.name} ({rate})", unit="frame", disable=not progress)
        with bar:
            for m in qbag.messages():
                if m.kind == "info":
                    self.pub_info.publish(deserialize_message(m.raw, self._types[m.msgtype]))
                    if t_start is None:
                        time.sleep(0.3)  # the very first camera_info: let it reach the node before any image
                    continue
                msg = deserialize_message(m.raw, self._types[m.msgtype])
                if first_stamp is None:
                    first_stamp, t_start = m.stamp_ns, time.monotonic()
                if rate != "max":
                    factor = 1.0 if rate == "recorded" else float(rate)
                    delay = t_start + (m.stamp_ns - first_stamp) * 1e-9 / factor - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                else:
                    time.sleep(INFO_LEAD_S)
                if self.pub_clock is not None:
                    from rosgraph_msgs.msg import Clock

                    self.pub_clock.publish(Clock(clock=msg.header.stamp))
                sent.append((m.stamp_ns, time.monotonic()))
                pub.publish(msg)
                bar.update()
                if rate == "max" and not self._wait_answer(m.stamp_ns, base, len(sent), timeout_s):
                    timeouts += 1
                    log.warning(f"no answer to the image at {m.stamp_ns * 1e-9:.3f} s within {timeout_s:.0f} s")
            # Drain: what is still queued in the node, then poses in flight.
            deadline = time.monotonic() + timeout_s
            t_answered = None  # when the node had answered every image
            while time.monotonic() < deadline and sent:
                done = self.answered()
                if all(self.has_pose(s) for s, _ in sent) or (base is not None and done is not None
                                                              and done >= base + len(sent)):
                    t_answered = time.monotonic()
                    break
                time.sleep(0.02)
            time.sleep(0.1)
        t_end = time.monotonic()
        if timeouts:
            log.warning(f"{timeouts} images got no answer within {timeout_s:.0f} s")
        stamps = [s for s, _ in sent]
        if len(set(stamps)) != len(stamps):
            log.warning("the bag has images with equal stamps: their poses cannot be told apart")
        with self._lock:
            poses = dict(self._poses)
        results = []
        last_pose = t_start or t_end
        for stamp, t_sent in sent:
            r = FrameResult(stamp, qbag.gt_at(stamp))
            got = poses.get(stamp)
            if got is not None:
                msg, t_recv = got
                r.T_est = rc.pose_to_matrix(msg.pose.pose)
                r.covariance_66 = np.asarray(msg.pose.covariance, dtype=np.float64).reshape(6, 6)
                r.latency_ms = (t_recv - t_sent) * 1e3
                last_pose = max(last_pose, t_recv)
            results.append(r)
        # Wall time: first image sent -> last answer (the last pose when every image got one).
        if results and all(r.T_est is not None for r in results):
            t_last = last_pose
        else:
            t_last = t_answered or t_end
        return results, t_last - (t_start or t_last)

    def _wait_answer(self, stamp_ns: int, base: int | None, n_sent: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.has_pose(stamp_ns):
                return True
            done = self.answered()
            if base is not None and done is not None and done >= base + n_sent:
                return True
            time.sleep(0.002)
        return False

    def destroy(self) -> None:
        self.node.destroy_node()


class LocalizerSession:
    """rclpy in a context of its own, the ``aceg_localizer`` node (unless external) and a ``ReplayPlayer``,
    spun by one multi-threaded executor on a background thread. Use as a context manager.

    ``params``: node parameter overrides (``model_path``, ``map_path``, ``mapping.*``, ``pnp.*`` ...);
    ``localizer`` / ``model``: injected into the node (tests, or an application's own).
    """

    def __init__(self, params: dict[str, Any] | None = None, *, localizer=None, model=None, external: bool = False,
                 namespace: str = DEFAULT_NAMESPACE, clock: bool = False) -> None:
        self.params = dict(params or {})
        self.localizer, self.model, self.external = localizer, model, external
        self.namespace, self.clock = namespace, clock
        self.context = self.executor = self.node = self.player = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LocalizerSession":
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        self.context = Context()
        # No rclpy signal handlers: Ctrl-C stays a KeyboardInterrupt, and __exit__ cleans up.
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        try:
            self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
            if not self.external:
                self._start_node()
            self.player = ReplayPlayer(self.context, self.namespace, clock=self.clock)
            self.executor.add_node(self.player.node)
            self._thread = threading.Thread(target=self._spin, name="aceg_replay_executor", daemon=True)
            self._thread.start()
            if self.node is not None:
                self._activate()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_node(self) -> None:
        from rclpy.parameter import Parameter

        from aceg_ros.localizer_node import AcegLocalizer

        params = {"points.period": 0.0, "diagnostics_period": DIAG_PERIOD_S, **self.params}
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        if self.clock:
            overrides.append(Parameter("use_sim_time", value=True))
        self.node = AcegLocalizer(NODE_NAME, namespace=self.namespace, localizer=self.localizer, model=self.model,
                                  parameter_overrides=overrides, context=self.context)
        self.executor.add_node(self.node)

    def _activate(self) -> None:
        from rclpy.lifecycle import TransitionCallbackReturn

        if self.node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            raise RuntimeError("the localizer node refused to configure (its log above says why)")
        if self.node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise RuntimeError("the localizer node refused to activate (its log above says why)")

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        from aceg_ros.spinning import spin

        try:
            spin(self.executor)
        except ExternalShutdownException:
            pass

    def __exit__(self, *exc) -> None:
        import rclpy

        if self.executor is not None:
            self.executor.shutdown(timeout_sec=5.0)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self.node is not None:
            self.node.close()
        if self.player is not None:
            self.player.destroy()
        if self.context is not None and self.context.ok():
            rclpy.shutdown(context=self.context)


# --- the CLI -----------------------------------------------------------------------------------


def parse_params(items: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings -> node parameter values (VALUE parsed as YAML: 3, 2.5, true, text)."""
    from aceg_ros import params as P

    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--param must be NAME=VALUE, got {item!r}")
        if name not in P.SPECS:
            raise ValueError(f"--param {name!r} is not a node parameter; see config/aceg.yaml")
        value = yaml.safe_load(text) if text else ""
        if isinstance(P.SPECS[name].default, str):
            value = text
        reason = P.check_value(name, value)
        if reason:
            raise ValueError(f"--param {reason}")
        out[name] = float(value) if isinstance(P.SPECS[name].default, float) else value
    return out


def _build_localizer(model_path: Path, map_path: Path, values: dict[str, Any], device: str):
    from aceg_model.localizer import Localizer
    from aceg_model.mapping import SceneMap
    from aceg_model.model import AcegModel, pick_device
    from aceg_ros import params as P

    model = AcegModel.load(model_path, pick_device(device))
    return Localizer(model, SceneMap.load(map_path, model), P.pnp_config(values))


def run_replay(qbag: QueryBag, *, offline: bool, model_path: Path | None, map_path: Path | None,
               values: dict[str, Any], rate: str | float = "max", timeout_s: float = 30.0, device: str = "auto",
               external: bool = False, namespace: str = DEFAULT_NAMESPACE, clock: bool = False, localizer=None,
               progress: bool = True) -> dict:
    """Replay ``qbag`` in one mode and return the report dict (see ``aceg_ros.report``).

    ``localizer`` (optional): use this ``Localizer`` instead of loading ``model_path`` / ``map_path``.
    """
    elsewhere = "(injected localizer)" if localizer is not None else "(the running node's)"
    meta = {"tool": "aceg-replay", "mode": "offline" if offline else "dds",
            "rate": "n/a (offline)" if offline else (rate if isinstance(rate, str) else f"x{rate:g}"),
            "bag": str(qbag.path), "image_topic": qbag.image_topic, "camera_info_topic": qbag.camera_info_topic,
            "gt_source": qbag.gt_source or "none",
            "map": str(map_path) if map_path else elsewhere, "model": str(model_path) if model_path else elsewhere,
            "params": {k: v for k, v in values.items()}, "notes": list(qbag.notes)}
    if offline:
        meta["latency_measures"] = "decode + localize of one image in this process (the node's per-frame work)"
        meta["clock"] = "none: no node; frames carry their bag stamps"
        if localizer is None:
            localizer = _build_localizer(model_path, map_path, values, device)
        else:  # as the node does with an injected localizer: the pnp.* parameters apply
            from aceg_ros import params as P

            localizer.pnp = P.pnp_config(values)
        results, wall = replay_offline(qbag, localizer, values, progress)
    else:
        meta["latency_measures"] = "image published -> its pose received over DDS (end to end)"
        meta["clock"] = ("poses matched by image header stamp (bag time); "
                         + ("/clock published from bag stamps, node use_sim_time true" if clock
                            else "node on wall time (use_sim_time false), used only for diagnostics"))
        params = dict(values)
        params["image_transport"] = "compressed" if qbag.compressed else "raw"
        if localizer is None and not external:
            params["model_path"], params["map_path"] = str(model_path), str(map_path)
        if not external:
            params["device"] = device
        with LocalizerSession(params, localizer=localizer, external=external, namespace=namespace,
                              clock=clock) as session:
            results, wall = session.player.play(qbag, rate, timeout_s, progress)
    return summarize(results, meta, wall)


def _file(path: Path | None, what: str) -> Path:
    if path is None or not Path(path).is_file():
        raise ValueError(f"{what} {path} is not a file")
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aceg-replay", description="Play a query bag through the ACE-G localizer "
                                "(the real node over DDS, or offline) and report accuracy against the bag's ground "
                                "truth, failures, latency and throughput.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bag", type=Path, required=True, help="rosbag2 folder (mcap or sqlite3) or .mcap/.db3 file")
    p.add_argument("--map", type=Path, default=None, help="map file (safetensors) made for --model; "
                   "required unless --external-node")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pre-trained model (safetensors)")
    p.add_argument("--offline", action="store_true", help="call the localizer directly instead of the node over DDS")
    p.add_argument("--image-topic", default="auto", help="image topic (Image or CompressedImage); auto = the only one")
    p.add_argument("--camera-info-topic", default="auto", help="camera_info topic; auto = the only one")
    p.add_argument("--gt-topic", default="auto", help="ground truth: auto, none, a pose topic (PoseStamped, "
                   "PoseWithCovarianceStamped, Odometry) or /tf for the TF chain --gt-parent -> image frame")
    p.add_argument("--gt-parent", default="map", help="map frame of the ground truth (TF parent)")
    p.add_argument("--gt-child", default=None, help="camera frame of the TF ground truth (default: the images' "
                   "header.frame_id)")
    p.add_argument("--max-gt-gap", type=float, default=bag_io.DEFAULT_MAX_POSE_GAP_S,
                   help="largest time from an image to the ground-truth samples it is interpolated from (s)")
    p.add_argument("--rate", default="max", help=f"DDS pacing: {RATE_HELP} (max: next image once the node "
                   "answered; recorded: bag timing; FACTOR: bag timing sped up)")
    p.add_argument("--timeout", type=float, default=30.0, help="how long to wait for the node's answer to one "
                   "image, and to drain at the end (s)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="node parameter for both modes (e.g. pnp.threshold_px=8); repeatable")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--clock", action="store_true", help="publish /clock from bag stamps and run the node with "
                   "use_sim_time true")
    p.add_argument("--external-node", action="store_true", help="do not start a node: replay to a running "
                   "aceg_localizer in --namespace (its own model and map)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="namespace of the localizer node")
    p.add_argument("--json", type=Path, required=True, help="report JSON to write")
    p.add_argument("--report-dir", type=Path, default=None, help="also write report.md and PNG plots here")
    p.add_argument("--title", default=None, help="title of the Markdown report and plots (default: bag name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    # OpenMP threads that sleep while waiting: spinning ones slowed inference ~40x on a shared CPU.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        rate = parse_rate(args.rate)
        if args.timeout <= 0:
            raise ValueError(f"--timeout must be > 0 s, got {args.timeout}")
        if args.offline and args.external_node:
            raise ValueError("--offline and --external-node exclude each other")
        values = parse_params(args.param)
        model_path = map_path = None
        if not args.external_node:
            model_path = _file(args.model, "model file (--model)")
            map_path = _file(args.map, "map file (--map)")
        qbag = open_query_bag(args.bag, args.image_topic, args.camera_info_topic, args.gt_topic, args.gt_parent,
                              args.gt_child, args.max_gt_gap)
        print(f"aceg-replay: {qbag.n_images} images on {qbag.image_topic}, ground truth: "
              f"{qbag.gt_source or 'none'}" + "".join(f"; {n}" for n in qbag.notes), file=sys.stderr)
        report = run_replay(qbag, offline=args.offline, model_path=model_path, map_path=map_path, values=values,
                            rate=rate, timeout_s=args.timeout, device=args.device, external=args.external_node,
                            namespace=args.namespace, clock=args.clock, progress=not args.quiet)
        write_json(report, args.json)
        paths = write_report(report, args.report_dir, args.title or args.bag.name) if args.report_dir else {}
    except (ValueError, OSError, RuntimeError) as e:
        print(f"aceg-replay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aceg-replay: interrupted", file=sys.stderr)
        return 130
    print(f"{report['mode']}: {one_line(report)}")
    print(f"json: {args.json}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
