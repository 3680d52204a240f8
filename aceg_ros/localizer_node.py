"""The ``aceg_localizer`` node: camera images in; map-frame poses with covariance, TF, diagnostics out.

A managed (lifecycle) node, in namespace ``aceg`` by default; every name below
is relative, so it can be remapped:

- subscribes ``image`` (sensor_msgs/Image) or ``image/compressed``
  (sensor_msgs/CompressedImage, ``image_transport: compressed``) and
  ``camera_info``, with sensor-data QoS;
- publishes ``pose`` (geometry_msgs/PoseWithCovarianceStamped in ``map_frame``,
  stamped with the image stamp; latched: RELIABLE, TRANSIENT_LOCAL, depth 1 as
  AMCL's ``amcl_pose``), ``/tf`` (map->camera_frame, or map->odom), ``path``
  (nav_msgs/Path), ``map_points`` (sensor_msgs/PointCloud2 with rgb),
  ``mapping_progress`` (std_msgs/String, JSON) and ``/diagnostics``;
- serves ``map_scene`` (std_srvs/Trigger: map a scene from the bag named by
  the ``mapping.*`` parameters, write the map atomically, swap it in) and
  ``load_map`` (std_srvs/Trigger: load ``map_path`` and swap it in).

Lifecycle: configure loads the model and the map (``model_path``,
``map_path``, ``device``); activate subscribes and starts the worker;
deactivate unsubscribes and stops publishing; cleanup frees the model (and the
GPU memory). ``main`` configures and activates at once unless
``autostart: false``.

Only the newest frame is processed: the image callback puts the message in a
one-slot mailbox (replacing, and counting, a frame the worker has not taken
yet) and a worker thread decodes, localizes and publishes, so the executor
never blocks on inference. All stamps come from message headers and the node
clock, so bag replay with ``use_sim_time`` works. Parameters: ``aceg_ros.params``
and ``config/aceg.yaml``. The algorithm is ``aceg_model.localizer.Localizer``
and ``aceg_model.mapping.map_scene``; this file only converts, calls and
publishes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Path as PathMsg
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import String
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from aceg_model.lens import ImageUndistorter
from aceg_ros import params as P
from aceg_ros import ros_conversions as rc
from aceg_ros.spinning import spin

try:  # a real ROS install: map->odom and base poses through TF lookups
    import tf2_ros
except ImportError:  # this venv: no tf2_ros; those modes are refused at configure
    tf2_ros = None

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"
# Poses for late joiners and nav2 (as amcl_pose): reliable, latched, newest only.
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                         history=HistoryPolicy.KEEP_LAST)
# What tf2_ros's TransformBroadcaster uses.
TF_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
RATE_WINDOW_S = 5.0  # diagnostics rates and latencies are over this window
STALE_INPUT_S = 5.0  # diagnostics warn when no image arrived for this long while active
CLOUD_FRAMES_AFTER_MAPPING = 8  # mapping frames regressed for the point cloud after map_scene
# The executor's spin thread competes for the GIL with the mapping thread, whose many short torch
# ops each release and re-take it. At Python's default 5 ms switch interval a mapping iteration took
# 1.7 s in the demo process (0.15 s standalone), at 0.5 ms 0.6 s; the plane sweep 110 s -> 24 s.
GIL_SWITCH_INTERVAL_S = 0.0005

# (target, source, stamp msg, timeout s) -> T_target_source 4x4, or None when not available.
TfLookup = Callable[[str, str, Any, float], "np.ndarray | None"]


class LatestSlot:
    """A one-item mailbox: ``put`` replaces an item not yet taken (and counts it), ``take`` waits for one.

    What keeps the node real-time: however slow inference is, at most one frame
    waits, and it is always the newest.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._item: Any = None
        self._closed = False
        self.replaced = 0

    def put(self, item: Any) -> bool:
        """Store ``item``; True when it replaced one the consumer never took."""
        with self._cv:
            replaced = self._item is not None
            self.replaced += int(replaced)
            self._item = item
            self._cv.notify()
            return replaced

    def take(self, timeout: float | None = None) -> Any:
        """The newest item (and empty the slot), or None after ``timeout`` s or once closed."""
        with self._cv:
            if self._item is None and not self._closed:
                self._cv.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._item = None
            self._cv.notify_all()

    def reopen(self) -> None:
        with self._cv:
            self._closed = False


@dataclass
class _Pending:
    """What the image callback hands to the worker."""

    msg: Any
    compressed: bool
    camera: rc.CameraModel | None
    camera_error: str
    received: float  # time.monotonic() s


@dataclass
class _Stats:
    """Counters and recent timings for /diagnostics (guarded by the node's stats lock)."""

    received: int = 0
    processed: int = 0
    localized: int = 0
    replaced: int = 0  # newest-frame-only drops
    rejected: dict[str, int] = field(default_factory=dict)  # reason key -> count
    last_reason: str = ""
    last_inliers: int = 0
    last_correspondences: int = 0
    received_t: deque = field(default_factory=lambda: deque(maxlen=2000))
    localized_t: deque = field(default_factory=lambda: deque(maxlen=2000))
    timings: deque = field(default_factory=lambda: deque(maxlen=100))  # (t, {stage: ms})
    last_image_t: float = 0.0


class _MappingCancelled(Exception):
    pass


@dataclass
class _MappingJob:
    bag: str
    output: str
    values: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    success: bool = False
    message: str = ""
    stage: str = "starting"
    progress: float = 0.0
    started: float = field(default_factory=time.monotonic)


class VoxelCloud:
    """A bounded, voxel-downsampled coloured point set (first point per voxel kept, oldest voxels dropped)."""

    def __init__(self) -> None:
        self._voxels: OrderedDict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def add(self, points_N3: np.ndarray, rgb_N3: np.ndarray, voxel: float, max_points: int) -> None:
        keys_N3 = np.floor(points_N3 / voxel).astype(np.int64)
        for key, p, c in zip(map(tuple, keys_N3), points_N3, rgb_N3):
            if key not in self._voxels:
                self._voxels[key] = (p, c)
        while len(self._voxels) > max_points:
            self._voxels.popitem(last=False)

    def clear(self) -> None:
        self._voxels.clear()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._voxels:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
        pts, rgb = zip(*self._voxels.values())
        return np.asarray(pts, np.float32), np.asarray(rgb, np.uint8)

    def __len__(self) -> int:
        return len(self._voxels)


class AcegLocalizer(LifecycleNode):
    """ACE-G relocalization as a managed ROS 2 node (see the module docstring for its interface).

    ``localizer`` / ``model`` / ``tf_lookup`` may be injected (tests, or an
    application that builds its own): an injected ``Localizer`` is used instead
    of loading ``model_path`` / ``map_path``; ``model`` is the network used for
    mapping and map loading (default: the localizer's); ``tf_lookup`` replaces
    tf2_ros for the TF lookups of ``tf_mode: map_to_odom`` and ``pose_frame: base``.
    """

    def __init__(self, node_name: str = "aceg_localizer", *, localizer=None, model=None,
                 tf_lookup: TfLookup | None = None, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self._injected_localizer = localizer
        self._injected_model = model if model is not None else getattr(localizer, "model", None)
        self._injected_lookup = tf_lookup
        self._localizer = None  # aceg_model.localizer.Localizer, swapped under _map_lock
        self._model = None
        self._map_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats = _Stats()
        self._slot = LatestSlot()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._camera: rc.CameraModel | None = None
        self._camera_key = None
        self._camera_error = "no camera_info received yet"
        self._undistort = ImageUndistorter()  # camera_info's distortion removed, remap tables built once
        self._viz_lock = threading.Lock()  # guards _path, _cloud, _cloud_t
        self._path: deque = deque()
        self._cloud = VoxelCloud()
        self._cloud_t = -math.inf
        self._last_map_odom: tuple[np.ndarray, int] | None = None  # (T_map_odom, stamp ns sent last)
        self._map_odom_lock = threading.Lock()
        self._mapping_lock = threading.Lock()
        self._mapping: _MappingJob | None = None
        self._last_mapping: _MappingJob | None = None
        self._log_times: dict[str, float] = {}
        self._lookup: TfLookup | None = None
        self._tf_buffer = self._tf_listener = None
        self._active = False
        self._tf_mode, self._pose_frame = P.SPECS["tf_mode"].default, P.SPECS["pose_frame"].default
        self._entities: dict[str, Any] = {}
        self._subs: list = []
        self._tf_timer = None

        # One group per concern: inputs, services (reentrant: map_scene waits while a
        # second call must still be answered), timers. Needs a multi-threaded executor.
        self._cb_inputs = MutuallyExclusiveCallbackGroup()
        self._cb_services = ReentrantCallbackGroup()
        self._cb_timers = MutuallyExclusiveCallbackGroup()

        # Validation first, so start-up overrides (YAML, launch, CLI) are checked on declaration.
        self.add_on_set_parameters_callback(self._check_parameters)
        try:
            P.declare_all(self)
        except Exception:
            self._destroy()
            raise
        self.add_post_set_parameters_callback(self._apply_parameters)
        # The services live as long as the node (a call in flight never loses its service);
        # they refuse, saying why, until the node is configured.
        self.create_service(Trigger, "map_scene", self._on_map_scene, callback_group=self._cb_services)
        self.create_service(Trigger, "load_map", self._on_load_map, callback_group=self._cb_services)

    # --- parameters -----------------------------------------------------------------------------

    def _values(self) -> dict[str, Any]:
        return {s.name: self.get_parameter(s.name).value for s in P.PARAMETERS if self.has_parameter(s.name)}

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _check_parameters(self, parameters):
        result = P.check_parameters(parameters, self._values())
        if not result.successful:
            self.get_logger().error(f"parameter refused: {result.reason}")
        return result

    def _apply_parameters(self, parameters) -> None:
        names = {p.name for p in parameters}
        if any(n.startswith("pnp.") for n in names):
            with self._map_lock:
                if self._localizer is not None:
                    self._localizer.pnp = P.pnp_config(self._values())
        if "path.max_poses" in names:
            with self._viz_lock:
                self._path = deque(self._path, maxlen=max(self._p("path.max_poses"), 1))

    # --- lifecycle ------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as e:  # noqa: BLE001 - any failure is a refused transition with its reason
            self.get_logger().error(f"configure failed: {e}")
            self._release()
            return FAILURE
        return SUCCESS

    def _configure(self) -> None:
        from aceg_model.model import AcegModel, pick_device

        v = self._values()
        # TF mode and pose frame decide what is set up here, so they hold until the next configure.
        self._tf_mode, self._pose_frame = v["tf_mode"], v["pose_frame"]
        needs_tf = v["tf_mode"] == "map_to_odom" or v["pose_frame"] == "base"
        if needs_tf:
            if self._injected_lookup is not None:
                self._lookup = self._injected_lookup
            elif tf2_ros is not None:
                self._tf_buffer = tf2_ros.Buffer()
                self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self, spin_thread=False)
                self._lookup = self._tf2_lookup
            else:
                what = "tf_mode map_to_odom" if v["tf_mode"] == "map_to_odom" else "pose_frame base"
                raise ValueError(f"{what} needs TF lookups, and tf2_ros is not importable here; "
                                 "use tf_mode map_to_camera (or none) and pose_frame camera, or run on a ROS 2 "
                                 "install with tf2_ros")
        if self._injected_localizer is not None:
            self._model = self._injected_model
            self._localizer = self._injected_localizer
            self._localizer.pnp = P.pnp_config(v)
            self.get_logger().info(f"using the injected localizer on {self._localizer.device}")
        else:
            device = pick_device(v["device"])
            model_path = Path(v["model_path"] or DEFAULT_MODEL).expanduser()
            if self._injected_model is not None:
                self._model = self._injected_model
            else:
                if not model_path.is_file():
                    raise ValueError(f"model_path {str(model_path)!r} is not a file; set model_path to a "
                                     "pre-trained model (safetensors)")
                t0 = time.perf_counter()
                self._model = AcegModel.load(model_path, device)
                self.get_logger().info(f"loaded model {model_path} on {device} in {time.perf_counter() - t0:.1f} s")
            if v["map_path"]:
                self._localizer = self._load_localizer(v["map_path"])
            else:
                self.get_logger().warning("no map_path: configured without a map; call map_scene or set map_path "
                                       "and call load_map")
        with self._viz_lock:
            self._path = deque(maxlen=max(v["path.max_poses"], 1))
        qos_progress = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._entities = {
            "pose": self.create_lifecycle_publisher(rc.PoseWithCovarianceStamped, "pose", LATCHED_QOS),
            "tf": self.create_lifecycle_publisher(TFMessage, "/tf", TF_QOS),
            "path": self.create_lifecycle_publisher(PathMsg, "path", LATCHED_QOS),
            "points": self.create_lifecycle_publisher(PointCloud2, "map_points", LATCHED_QOS),
            # Visible in every state: what the node is doing and why it is not localizing.
            "diagnostics": self.create_publisher(DiagnosticArray, "/diagnostics", 10),
            "progress": self.create_publisher(String, "mapping_progress", qos_progress),
        }
        # Diagnostics run on the steady clock: they keep coming while a replayed bag is paused.
        self._entities["diag_timer"] = self.create_timer(v["diagnostics_period"], self._publish_diagnostics,
                                                         callback_group=self._cb_timers,
                                                         clock=Clock(clock_type=ClockType.STEADY_TIME))

    def _load_localizer(self, path: str):
        from aceg_model.lens import mount_summary
        from aceg_model.localizer import Localizer
        from aceg_model.mapping import SceneMap

        t0 = time.perf_counter()
        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(f"map_path {str(p)!r} is not a file")
        scene_map = SceneMap.load(p, self._model)
        lens = scene_map.lens
        notes = ""
        if lens is not None:
            camera = f"its mapping camera ({lens.camera.width}x{lens.camera.height}, fx {lens.camera.fx:.2f})"
            if not lens.distortion.is_zero:
                notes += (f"; it removes lens distortion k1={lens.distortion.k1:.4f} k2={lens.distortion.k2:.4f} from "
                          f"images of {camera} and leaves other cameras' images as they are")
            if not lens.mount.is_identity:
                notes += (f"; mapping found the {mount_summary(lens.mount)}: poses of {camera} are published "
                          "for that pose frame")
        views = scene_map.views
        if views is not None:
            notes += (f"; it keeps its landmarks to visits of {views.window_s:g} s of its "
                      f"{len(views.stamps_I)} mapping images")
        self.get_logger().info(f"loaded map {p} ({scene_map.method}) in {time.perf_counter() - t0:.2f} s{notes}")
        return Localizer(self._model, scene_map, P.pnp_config(self._values()))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        v = self._values()
        if v["image_transport"] == "compressed":
            image_sub = self.create_subscription(CompressedImage, "image/compressed", self._on_compressed,
                                                 qos_profile_sensor_data, callback_group=self._cb_inputs)
        else:
            image_sub = self.create_subscription(Image, "image", self._on_image, qos_profile_sensor_data,
                                                 callback_group=self._cb_inputs)
        info_sub = self.create_subscription(CameraInfo, "camera_info", self._on_camera_info,
                                            qos_profile_sensor_data, callback_group=self._cb_inputs)
        self._subs = [image_sub, info_sub]
        self._stop.clear()
        self._slot.reopen()
        self._worker = threading.Thread(target=self._work, name="aceg_localizer_worker", daemon=True)
        self._worker.start()
        if self._tf_mode == "map_to_odom" and v["tf_publish_rate"] > 0:
            # On the node clock: with use_sim_time it follows /clock, like the stamps it writes.
            self._tf_timer = self.create_timer(1.0 / v["tf_publish_rate"], self._resend_map_odom,
                                               callback_group=self._cb_timers)
        self._active = True
        topic = self.resolve_topic_name("image/compressed" if v["image_transport"] == "compressed" else "image")
        self.get_logger().info(f"active: localizing images from {topic}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_io()
        self.get_logger().info("inactive: not subscribed, not publishing")
        return super().on_deactivate(state)

    def _stop_io(self) -> None:
        self._active = False
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self._tf_timer is not None:
            self.destroy_timer(self._tf_timer)
            self._tf_timer = None
        self._stop.set()
        self._slot.close()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            self._worker = None

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._cancel_mapping()
        self._release()
        self.get_logger().info("cleaned up: model and map released")
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_io()
        self._cancel_mapping()
        self._release()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_io()
        self._release()
        return SUCCESS

    def close(self) -> None:
        """Stop the worker and any mapping, free the model, destroy the node (any state; idempotent)."""
        self._stop_io()
        self._cancel_mapping()
        try:
            self._release()
        finally:
            self._destroy()

    def _destroy(self) -> None:
        # rclpy's LifecycleNode keeps the rcl node alive through its state machine until
        # garbage collection; release it now so the name can be reused at once.
        state_machine = getattr(self, "_state_machine", None)
        if state_machine is not None:
            state_machine.destroy_when_not_in_use()
        self.destroy_node()

    def _release(self) -> None:
        for name, entity in list(self._entities.items()):
            if name.endswith("timer"):
                self.destroy_timer(entity)
            elif name in ("diagnostics", "progress"):
                self.destroy_publisher(entity)
            else:
                self.destroy_lifecycle_publisher(entity)
        self._entities = {}
        if self._tf_listener is not None:
            self._tf_listener.unregister()
        self._tf_buffer = self._tf_listener = self._lookup = None
        with self._map_lock:
            on_gpu = self._model is not None and getattr(self._model, "device", None) is not None \
                and self._model.device.type == "cuda"
            self._localizer = None
            self._model = None
        with self._viz_lock:
            self._cloud.clear()
            self._path.clear()
        with self._map_odom_lock:
            self._last_map_odom = None
        if on_gpu:
            import torch

            torch.cuda.empty_cache()

    def _cancel_mapping(self) -> None:
        job = self._mapping
        if job is not None and not job.done.is_set():
            job.cancel.set()
            job.done.wait(timeout=60.0)

    # --- inputs ---------------------------------------------------------------------------------

    def _on_camera_info(self, msg: CameraInfo) -> None:
        rectified = self._p("image_is_rectified")
        key = (tuple(msg.k), tuple(msg.p), tuple(msg.d), msg.distortion_model, msg.width, msg.height,
               msg.binning_x, msg.binning_y, msg.roi.width, msg.roi.height, msg.roi.x_offset, msg.roi.y_offset,
               msg.header.frame_id, rectified)
        if key == self._camera_key:
            return
        self._camera_key = key
        try:
            self._camera = rc.camera_model_from_info(msg, rectified)
            self._camera_error = ""
            self.get_logger().info(f"camera: {self._camera.intrinsics}, distortion "
                                   f"{self._camera.distortion_model or 'none'} {list(self._camera.D)}")
        except ValueError as e:
            self._camera, self._camera_error = None, f"bad camera_info: {e}"
            self.get_logger().error(self._camera_error)

    def _on_image(self, msg: Image) -> None:
        self._enqueue(msg, compressed=False)

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._enqueue(msg, compressed=True)

    def _enqueue(self, msg, compressed: bool) -> None:
        now = time.monotonic()
        with self._stats_lock:
            self._stats.received += 1
            self._stats.received_t.append(now)
            self._stats.last_image_t = now
        if self._slot.put(_Pending(msg, compressed, self._camera, self._camera_error, now)):
            with self._stats_lock:
                self._stats.replaced += 1

    # --- worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._slot.take(timeout=0.2)
            if item is None:
                continue
            try:
                self._process(item)
            except Exception as e:  # noqa: BLE001 - a bad frame must never kill the worker
                self._reject("error", f"unexpected error while localizing: {type(e).__name__}: {e}")

    def _reject(self, key: str, reason: str) -> None:
        """Count a frame that gave no pose, and log why (each kind at most every 5 s)."""
        with self._stats_lock:
            self._stats.processed += 1
            self._stats.rejected[key] = self._stats.rejected.get(key, 0) + 1
            self._stats.last_reason = reason
        now = time.monotonic()
        if now - self._log_times.get(key, -math.inf) >= 5.0:
            self._log_times[key] = now
            # One call site per severity: rclpy refuses to change a call site's severity.
            if key == "not_localized":
                self.get_logger().warning(f"frame dropped ({key}): {reason}")
            else:
                self.get_logger().error(f"frame dropped ({key}): {reason}")

    def _process(self, item: _Pending) -> None:
        msg = item.msg
        t0 = time.perf_counter()
        try:
            image = rc.compressed_to_array(msg) if item.compressed else rc.image_to_array(msg)
        except ValueError as e:
            return self._reject("bad_image", str(e))
        camera = item.camera
        if camera is None:
            return self._reject("no_camera_info", item.camera_error)
        h, w = image.shape[:2]
        if (w, h) != (camera.intrinsics.width, camera.intrinsics.height):
            return self._reject("size_mismatch", f"image is {w}x{h} px, camera_info is "
                                f"{camera.intrinsics.width}x{camera.intrinsics.height} px")
        if camera.distorted:
            if not self._p("undistort"):
                return self._reject("distorted", f"camera_info has {camera.distortion_model} distortion "
                                    f"{list(camera.D)} and undistort is false")
            try:
                image = self._undistort(image, camera.intrinsics, camera.D, camera.fisheye)
            except Exception as e:  # noqa: BLE001 - ValueError or cv2.error: the frame is unusable
                return self._reject("distorted", f"cannot undistort: {e}")
        t_decode = (time.perf_counter() - t0) * 1e3
        with self._map_lock:
            localizer = self._localizer
        if localizer is None:
            return self._reject("no_map", "no map loaded: call map_scene, or set map_path and call load_map")
        result = localizer.localize(image, camera.intrinsics)
        with self._stats_lock:
            self._stats.last_inliers, self._stats.last_correspondences = result.n_inliers, result.n_correspondences
        if not result.success:
            return self._reject("not_localized", result.reason)
        t1 = time.perf_counter()
        if not self._publish_pose(result, msg.header, camera):
            return
        timings = {"decode": t_decode, **result.timings_ms, "publish": (time.perf_counter() - t1) * 1e3,
                   "node_total": (time.perf_counter() - t0) * 1e3,
                   "since_received": (time.monotonic() - item.received) * 1e3}
        now = time.monotonic()
        with self._stats_lock:
            self._stats.processed += 1
            self._stats.localized += 1
            self._stats.localized_t.append(now)
            self._stats.timings.append((now, timings))
        period = self._p("points.period")
        with self._viz_lock:
            due = period > 0 and now - self._cloud_t >= period
            if due:
                self._cloud_t = now
        if due:
            self._extend_cloud(localizer, [(image, camera.intrinsics)], msg.header.stamp)

    def _publish_pose(self, result, header, camera: rc.CameraModel) -> bool:
        v = self._values()
        stamp = header.stamp
        cam_frame = header.frame_id or camera.frame_id
        T_map_cam = result.T_world_cam  # the map frame is the scene ("world") frame of the map
        T_map_body, cov = T_map_cam, result.covariance_66
        if self._pose_frame == "base":
            T_cam_base = self._lookup_tf(cam_frame, v["base_frame"], stamp)
            if T_cam_base is None:
                self._reject("no_tf", f"no TF {cam_frame} -> {v['base_frame']} at the image stamp")
                return False
            T_map_body = T_map_cam @ T_cam_base
            cov = rc.covariance_of_attached_frame(cov, T_map_cam, T_map_body)
        try:
            pose_msg = rc.pose_with_covariance(T_map_body, cov, v["map_frame"], stamp)
        except ValueError as e:
            self._reject("bad_covariance", str(e))
            return False
        self._entities["pose"].publish(pose_msg)

        if self._tf_mode == "map_to_camera":
            self._entities["tf"].publish(TFMessage(transforms=[
                rc.transform_stamped(T_map_cam, v["map_frame"], v["camera_frame"], stamp)]))
        elif self._tf_mode == "map_to_odom":
            T_odom_cam = self._lookup_tf(v["odom_frame"], cam_frame, stamp)
            if T_odom_cam is None:
                self._log_once_per("no_odom_tf", f"no TF {v['odom_frame']} -> {cam_frame} at the image stamp; "
                                   "map->odom not updated")
            else:
                T_map_odom = rc.map_to_odom(T_map_cam, T_odom_cam)
                stamp_tf = rc.stamp_plus(stamp, v["transform_tolerance"])
                # Record and publish under one lock: otherwise the re-send timer can slip in between and
                # send a later stamp first, so that this one would go back in time for listeners.
                with self._map_odom_lock:
                    self._last_map_odom = (T_map_odom, rc.stamp_to_ns(stamp_tf))
                    self._entities["tf"].publish(TFMessage(transforms=[
                        rc.transform_stamped(T_map_odom, v["map_frame"], v["odom_frame"], stamp_tf)]))

        if v["path.max_poses"] > 0:
            ps = PoseStamped()
            ps.header, ps.pose = pose_msg.header, pose_msg.pose.pose
            path = PathMsg()
            path.header = pose_msg.header
            with self._viz_lock:
                self._path.append(ps)
                path.poses = list(self._path)
            self._entities["path"].publish(path)
        return True

    def _log_once_per(self, key: str, text: str, period: float = 5.0) -> None:
        now = time.monotonic()
        if now - self._log_times.get(key, -math.inf) >= period:
            self._log_times[key] = now
            self.get_logger().warning(text)

    def _resend_map_odom(self) -> None:
        """Timer: re-send the last map->odom stamped now + tolerance (AMCL keeps map->odom alive the same way)."""
        with self._map_odom_lock:
            if self._last_map_odom is None or "tf" not in self._entities:
                return
            T_map_odom, last_ns = self._last_map_odom
            stamp_ns = self.get_clock().now().nanoseconds + round(self._p("transform_tolerance") * 1e9)
            if stamp_ns <= last_ns:  # never repeat or go back in time (TF_REPEATED_DATA)
                return
            self._last_map_odom = (T_map_odom, stamp_ns)
            self._entities["tf"].publish(TFMessage(transforms=[rc.transform_stamped(
                T_map_odom, self._p("map_frame"), self._p("odom_frame"), rc.ns_to_stamp(stamp_ns))]))

    def _lookup_tf(self, target: str, source: str, stamp) -> np.ndarray | None:
        if self._lookup is None:
            return None
        try:
            return self._lookup(target, source, stamp, self._p("tf_lookup_timeout"))
        except Exception as e:  # noqa: BLE001 - a failed lookup is a missing transform
            self._log_once_per(f"tf:{target}:{source}", f"TF lookup {target} <- {source} failed: {e}")
            return None

    def _tf2_lookup(self, target: str, source: str, stamp, timeout: float) -> np.ndarray | None:
        from rclpy.duration import Duration
        from rclpy.time import Time

        try:
            ts = self._tf_buffer.lookup_transform(target, source, Time.from_msg(stamp),
                                                  timeout=Duration(seconds=timeout))
        except tf2_ros.TransformException as e:
            self._log_once_per(f"tf:{target}:{source}", f"TF {target} <- {source} not available: {e}")
            return None
        return rc.transform_to_matrix(ts.transform)

    # --- visualization --------------------------------------------------------------------------

    def _extend_cloud(self, localizer, views, stamp) -> None:
        """Add the confident scene coordinates of ``views`` [(image, intrinsics)] to the map cloud and publish it."""
        max_sigma = self._p("points.max_sigma")
        for image, intrinsics in views:
            coords_P3, log_sigma_P, pixels_P2, _, _ = localizer.regress(image, intrinsics)
            keep = np.isfinite(coords_P3).all(axis=1) & (np.exp(log_sigma_P) < max_sigma)
            h, w = image.shape[:2]
            u = np.clip(np.round(pixels_P2[keep, 0]).astype(int), 0, w - 1)
            vv = np.clip(np.round(pixels_P2[keep, 1]).astype(int), 0, h - 1)
            rgb = image[vv, u] if image.ndim == 3 else np.repeat(image[vv, u][:, None], 3, axis=1)
            with self._viz_lock:
                self._cloud.add(coords_P3[keep], rgb, self._p("points.voxel"), self._p("points.max_points"))
        with self._viz_lock:
            pts, rgb = self._cloud.arrays()
        pub = self._entities.get("points")
        if pub is not None:
            pub.publish(rc.point_cloud_xyzrgb(pts, rgb, self._p("map_frame"), stamp))

    # --- diagnostics ----------------------------------------------------------------------------

    def _publish_diagnostics(self) -> None:
        pub = self._entities.get("diagnostics")
        if pub is None:
            return
        now = time.monotonic()
        with self._stats_lock:
            s = self._stats
            rate_in = sum(1 for t in s.received_t if now - t <= RATE_WINDOW_S) / RATE_WINDOW_S
            rate_out = sum(1 for t in s.localized_t if now - t <= RATE_WINDOW_S) / RATE_WINDOW_S
            recent = [tm for t, tm in s.timings if now - t <= RATE_WINDOW_S]
            counts = dict(received=s.received, processed=s.processed, localized=s.localized,
                          dropped_newest_only=s.replaced)
            rejected, last_reason = dict(s.rejected), s.last_reason
            inliers, corr, last_image_t = s.last_inliers, s.last_correspondences, s.last_image_t
        with self._map_lock:
            localizer = self._localizer
        lat = {}
        for stage in sorted({k for tm in recent for k in tm}):
            vals = [tm[stage] for tm in recent if stage in tm]
            lat[stage] = sum(vals) / len(vals)

        values = {
            "lifecycle_state": "active" if self._active else "inactive",
            "map_loaded": str(localizer is not None).lower(),
            "map_path": self._p("map_path"),
            "device": str(localizer.device) if localizer is not None else "",
            "input_rate_hz": f"{rate_in:.2f}",
            "pose_rate_hz": f"{rate_out:.2f}",
            **{f"frames_{k}": str(n) for k, n in counts.items()},
            **{f"rejected_{k}": str(n) for k, n in sorted(rejected.items())},
            "last_inliers": str(inliers),
            "last_correspondences": str(corr),
            "last_rejection": last_reason,
            **{f"latency_ms_{k}": f"{ms:.1f}" for k, ms in lat.items()},
        }
        if localizer is None:
            level, message = DiagnosticStatus.ERROR, "no map loaded"
        elif not self._active:
            level, message = DiagnosticStatus.OK, "inactive"
        elif counts["received"] == 0 or now - last_image_t > STALE_INPUT_S:
            level, message = DiagnosticStatus.WARN, f"no image for {STALE_INPUT_S:.0f} s"
        elif rate_in > 0 and rate_out == 0:
            level, message = DiagnosticStatus.WARN, f"not localizing: {last_reason}"
        else:
            level, message = DiagnosticStatus.OK, f"localizing at {rate_out:.1f} Hz"
        loc = DiagnosticStatus(level=level, name=f"{self.get_name()}: localization", message=message,
                               hardware_id=values["device"] or "none",
                               values=[KeyValue(key=k, value=str(val)) for k, val in values.items()])

        job = self._mapping or self._last_mapping
        if job is None:
            mstate, mlevel, mmsg = "idle", DiagnosticStatus.OK, "idle"
        elif not job.done.is_set():
            mstate, mlevel = "running", DiagnosticStatus.OK
            mmsg = f"{job.stage} {100 * job.progress:.0f}%"
        else:
            mstate = "done" if job.success else "failed"
            mlevel, mmsg = (DiagnosticStatus.OK if job.success else DiagnosticStatus.WARN), job.message
        mapping = DiagnosticStatus(level=mlevel, name=f"{self.get_name()}: mapping", message=mmsg[:500],
                                   hardware_id=values["device"] or "none",
                                   values=[KeyValue(key="state", value=mstate),
                                           KeyValue(key="bag", value=job.bag if job else ""),
                                           KeyValue(key="output", value=job.output if job else "")])
        arr = DiagnosticArray(status=[loc, mapping])
        arr.header.stamp = self.get_clock().now().to_msg()
        pub.publish(arr)

    # --- services -------------------------------------------------------------------------------

    def _on_load_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        path = self._p("map_path")
        if self._model is None:
            response.success, response.message = False, "refused: node is not configured (no model loaded)"
        elif self._mapping is not None and not self._mapping.done.is_set():
            response.success = False
            response.message = "refused: mapping is running; its map is swapped in when it finishes"
        elif not path:
            response.success, response.message = False, "refused: map_path is empty; set it to a map file first"
        else:
            try:
                localizer = self._load_localizer(path)
            except (ValueError, OSError) as e:
                response.success, response.message = False, f"could not load {path}: {e}"
            else:
                self._swap_in(localizer)
                response.success, response.message = True, f"loaded {path} ({localizer.scene_map.method})"
        if response.success:
            self.get_logger().info(f"load_map: {response.message}")
        else:
            self.get_logger().error(f"load_map: {response.message}")
        return response

    def _swap_in(self, localizer) -> None:
        with self._map_lock:
            self._localizer = localizer
        with self._viz_lock:
            self._cloud.clear()
            self._path.clear()
            self._cloud_t = -math.inf

    def _on_map_scene(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        v = self._values()
        with self._mapping_lock:
            running = self._mapping
            if running is not None and not running.done.is_set():
                response.success = False
                response.message = (f"refused: mapping already running ({running.stage}, "
                                    f"{100 * running.progress:.0f}%, {time.monotonic() - running.started:.0f} s); "
                                    "wait for it to finish")
                self.get_logger().warning(f"map_scene: {response.message}")
                return response
            reason = self._mapping_refusal(v)
            if reason:
                response.success, response.message = False, f"refused: {reason}"
                self.get_logger().error(f"map_scene: {response.message}")
                return response
            job = _MappingJob(bag=v["mapping.bag"], output=v["mapping.output"] or v["map_path"], values=v)
            self._mapping = job
            threading.Thread(target=self._run_mapping, args=(job,), name="aceg_mapping", daemon=True).start()
        # Wait in this (reentrant) callback; the worker keeps localizing and other calls are answered.
        job.done.wait()
        response.success, response.message = job.success, job.message
        return response

    def _mapping_refusal(self, v: dict[str, Any]) -> str:
        if self._model is None:
            return "node is not configured (no model loaded); configure it first"
        if not v["mapping.bag"]:
            return "mapping.bag is empty; set it to a rosbag2 folder"
        if not Path(v["mapping.bag"]).expanduser().exists():
            return f"mapping.bag {v['mapping.bag']!r} does not exist"
        out = v["mapping.output"] or v["map_path"]
        if not out:
            return "no output: set mapping.output (or map_path)"
        parent = Path(out).expanduser().parent
        if not parent.is_dir():
            return f"output folder {str(parent)!r} does not exist"
        if not os.access(parent, os.W_OK):
            return f"output folder {str(parent)!r} is not writable"
        return ""

    def _run_mapping(self, job: _MappingJob) -> None:
        from aceg_model.lens import lens_summary
        from aceg_model.localizer import Localizer
        from aceg_model.mapping import map_scene, mapping_config
        from aceg_model.map_consistency import consistency_summary
        from aceg_model.pose_check import pose_check_summary
        from aceg_model.pose_refinement import refinement_summary
        from aceg_ros.bag_io import read_bag_frames

        log = self.get_logger()
        v = job.values
        last_log = [-math.inf]

        def progress(stage: str, done: int, total: int, stats: dict) -> None:
            if job.cancel.is_set():
                raise _MappingCancelled()
            job.stage, job.progress = stage, done / max(total, 1)
            text = {"stage": stage, "done": done, "total": total,
                    **{k: float(x) for k, x in stats.items() if isinstance(x, (int, float))}}
            pub = self._entities.get("progress")
            if pub is not None:
                pub.publish(String(data=json.dumps(text)))
            now = time.monotonic()
            if now - last_log[0] >= 5.0 or done == total:
                last_log[0] = now
                extra = f", loss {stats['loss']:.3f}" if "loss" in stats else ""
                log.info(f"mapping: {stage} {done}/{total}{extra}")

        t0 = time.monotonic()
        try:
            progress("reading_bag", 0, 1, {})
            frames, report = read_bag_frames(
                Path(job.bag).expanduser(), v["mapping.image_topic"], v["mapping.camera_info_topic"],
                pose_topic=v["mapping.pose_topic"] or None, tf_parent=v["mapping.tf_parent"],
                tf_child=v["mapping.tf_child"] or None, max_pose_gap=v["mapping.max_pose_gap"],
                undistort=v["undistort"])
            progress("reading_bag", 1, 1, {})
            dropped = _dropped_summary(report, len(frames))
            cfg = mapping_config(method=v["mapping.method"], iterations=v["mapping.iterations"],
                                 batch_patches=v["mapping.batch_patches"], sweep_scale=v["mapping.sweep_scale"],
                                 photo_depth=v["mapping.photo_depth"], estimate_lens=v["mapping.estimate_lens"],
                                 estimate_mount=v["mapping.estimate_mount"], check_poses=v["mapping.check_poses"],
                                 refine_poses=v["mapping.refine_poses"], visit_window_s=v["mapping.visit_window_s"])
            scene_map, rep = map_scene(self._model, frames, cfg, progress, P.pnp_config(v))
            out = Path(job.output).expanduser()
            progress("writing", 0, 1, {})
            scene_map.save(out)  # atomic: a temporary file renamed over the target
            localizer = Localizer(self._model, scene_map, P.pnp_config(self._values()))
            self._swap_in(localizer)
            progress("writing", 1, 1, {})
            if self._p("map_path") != str(out):
                self.set_parameters([Parameter("map_path", value=str(out))])
            if self._p("points.period") > 0 and frames:
                step = max(1, len(frames) // CLOUD_FRAMES_AFTER_MAPPING)
                views = [(f.image, f.intrinsics) for f in frames[::step][:CLOUD_FRAMES_AFTER_MAPPING]]
                self._extend_cloud(localizer, views, self.get_clock().now().to_msg())
            if rep.pose_check is not None and rep.pose_check.flagged:
                log.warning(f"map_scene: {pose_check_summary(rep.pose_check)}")
            job.success = True
            job.message = (f"mapped {rep.n_frames} frames ({dropped}) with {rep.method}, {rep.iterations} "
                           f"iterations in {time.monotonic() - t0:.1f} s: final loss {rep.final_loss:.4g}, "
                           f"median reprojection {rep.final_median_px:.1f} px; lens: "
                           f"{'not estimated' if rep.lens is None else lens_summary(rep.lens)}; "
                           f"{'poses not checked' if rep.pose_check is None else pose_check_summary(rep.pose_check)}; "
                           f"{'' if rep.pose_refinement is None else refinement_summary(rep.pose_refinement) + '; '}"
                           f"visits: {consistency_summary(rep.consistency)}; wrote {out} and swapped it in")
        except _MappingCancelled:
            job.success, job.message = False, "mapping cancelled (node cleaned up or shut down); no map written"
        except Exception as e:  # noqa: BLE001 - reported to the caller, never fatal to the node
            job.success = False
            job.message = f"mapping failed after {time.monotonic() - t0:.1f} s: {type(e).__name__}: {e}"
        finally:
            if job.success:
                log.info(f"map_scene: {job.message}")
            else:
                log.error(f"map_scene: {job.message}")
            job.stage = "done"
            self._last_mapping = job
            job.done.set()


def _dropped_summary(report: Any, n_used: int) -> str:
    """'N dropped (why)' from the bag reader's ``BagReadReport``."""
    no_pose = int(getattr(report, "dropped_no_pose", 0))
    no_info = int(getattr(report, "dropped_before_camera_info", 0))
    images = int(getattr(report, "images", n_used + no_pose + no_info))
    return (f"{images - n_used} of {images} images dropped: {no_pose} without a pose, "
            f"{no_info} before the first camera_info")


def main(args: list[str] | None = None) -> int:
    """Run the node: ``aceg_localizer --ros-args --params-file config/aceg.yaml [-r __ns:=/aceg]``."""
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

    with rclpy.init(args=args):
        try:
            node = AcegLocalizer(namespace="aceg")
        except (InvalidParameterValueException, InvalidParameterTypeException) as e:
            rclpy.logging.get_logger("aceg_localizer").fatal(f"bad parameter: {e}")
            return 2
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        try:
            if node.get_parameter("autostart").value:
                if node.trigger_configure() != SUCCESS:
                    node.get_logger().fatal("configure failed (reason above); exiting")
                    return 1
                if node.trigger_activate() != SUCCESS:
                    node.get_logger().fatal("activate failed (reason above); exiting")
                    return 1
            spin(executor)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            node.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
