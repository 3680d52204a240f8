"""ROS messages <-> numpy: poses, covariances, TF, stamps, camera_info, images, point clouds.

Conventions (REP 103 / REP 105, and ``aceg_model.frames``):

- A pose ``T_a_b`` (4x4, float64, metres) maps points from frame b to frame a;
  as a ROS message it is the pose of frame b expressed in frame a (header
  frame a, child b).
- Camera frames are *optical* frames (x right, y down, z forward), the
  OpenCV convention the localizer uses and REP 103's ``*_optical_frame``.
  :data:`R_BODY_OPTICAL` rotates optical axes into the REP 103 body
  convention (x forward, y left, z up) for readers who need it.
- Covariance: 6x6, row-major, order (x, y, z, rot X, rot Y, rot Z), m², m·rad,
  rad², in the header frame (map): position errors along the map axes and a
  small rotation about the fixed map axes (left perturbation), the meaning of
  ``aceg_model.pnp.pose_covariance``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from builtin_interfaces.msg import Time as TimeMsg
from geometry_msgs.msg import Pose, PoseWithCovarianceStamped, Transform, TransformStamped
from sensor_msgs.msg import PointCloud2, PointField

from aceg_model.frames import Intrinsics
from aceg_model.geometry import invert, pose_from_quat, quat_from_pose, skew

# Optical (x right, y down, z forward) -> body (x forward, y left, z up): v_body = R_BODY_OPTICAL @ v_optical.
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
# Smallest variance written to a covariance diagonal, so no message ever claims certainty [m², rad²].
MIN_VARIANCE = 1e-9
_NS = 1_000_000_000


# --- Time --------------------------------------------------------------------------------------

def stamp_to_ns(stamp: TimeMsg) -> int:
    return int(stamp.sec) * _NS + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> TimeMsg:
    ns = max(int(ns), 0)
    return TimeMsg(sec=ns // _NS, nanosec=ns % _NS)


def stamp_plus(stamp: TimeMsg, seconds: float) -> TimeMsg:
    """``stamp`` + ``seconds`` (e.g. the transform tolerance of map->odom)."""
    return ns_to_stamp(stamp_to_ns(stamp) + round(seconds * _NS))


# --- Poses, transforms, covariance ---------------------------------------------------------------

def matrix_to_pose(T: np.ndarray) -> Pose:
    t, q = quat_from_pose(np.asarray(T, dtype=np.float64))
    p = Pose()
    p.position.x, p.position.y, p.position.z = (float(v) for v in t)
    p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = (float(v) for v in q)
    return p


def pose_to_matrix(p: Pose) -> np.ndarray:
    o = p.orientation
    return pose_from_quat([p.position.x, p.position.y, p.position.z], [o.x, o.y, o.z, o.w])


def matrix_to_transform(T: np.ndarray) -> Transform:
    t, q = quat_from_pose(np.asarray(T, dtype=np.float64))
    tr = Transform()
    tr.translation.x, tr.translation.y, tr.translation.z = (float(v) for v in t)
    tr.rotation.x, tr.rotation.y, tr.rotation.z, tr.rotation.w = (float(v) for v in q)
    return tr


def transform_to_matrix(tr: Transform) -> np.ndarray:
    r, t = tr.rotation, tr.translation
    return pose_from_quat([t.x, t.y, t.z], [r.x, r.y, r.z, r.w])


def transform_stamped(T_parent_child: np.ndarray, parent: str, child: str, stamp: TimeMsg) -> TransformStamped:
    msg = TransformStamped()
    msg.header.frame_id, msg.header.stamp, msg.child_frame_id = parent, stamp, child
    msg.transform = matrix_to_transform(T_parent_child)
    return msg


def check_covariance(cov_66: np.ndarray | None) -> np.ndarray:
    """A publishable 6x6 covariance: finite, symmetrized, diagonal floored at MIN_VARIANCE; ValueError if not."""
    if cov_66 is None:
        raise ValueError("no covariance")
    cov = np.asarray(cov_66, dtype=np.float64)
    if cov.shape != (6, 6):
        raise ValueError(f"covariance must be 6x6, got shape {cov.shape}")
    if not np.all(np.isfinite(cov)):
        raise ValueError("covariance has NaN or inf entries")
    cov = 0.5 * (cov + cov.T)
    if np.any(np.diag(cov) < -MIN_VARIANCE):
        raise ValueError(f"covariance has negative variances: {np.diag(cov)}")
    idx = np.diag_indices(6)
    cov[idx] = np.maximum(cov[idx], MIN_VARIANCE)
    return cov


def pose_with_covariance(T_frame_body: np.ndarray, cov_66: np.ndarray, frame_id: str,
                         stamp: TimeMsg) -> PoseWithCovarianceStamped:
    """PoseWithCovarianceStamped of ``T_frame_body`` with a row-major 6x6 covariance (see module docstring)."""
    msg = PoseWithCovarianceStamped()
    msg.header.frame_id, msg.header.stamp = frame_id, stamp
    msg.pose.pose = matrix_to_pose(T_frame_body)
    msg.pose.covariance = [float(v) for v in check_covariance(cov_66).reshape(-1)]
    return msg


def covariance_of_attached_frame(cov_66: np.ndarray, T_map_a: np.ndarray, T_map_b: np.ndarray) -> np.ndarray:
    """Covariance of frame b's pose given frame a's, for b rigidly attached to a (e.g. camera -> base).

    With a's error ``(dp, dθ)`` (position along the map axes, rotation about the
    fixed map axes), b's position moves by ``dp + dθ × r`` with ``r = p_b - p_a``
    and its rotation by the same ``dθ``: ``J = [[I, -[r]x], [0, I]]``, cov_b = J cov_a Jᵀ.
    """
    r = np.asarray(T_map_b, dtype=np.float64)[:3, 3] - np.asarray(T_map_a, dtype=np.float64)[:3, 3]
    J = np.eye(6)
    J[:3, 3:] = -skew(r)
    cov = J @ np.asarray(cov_66, dtype=np.float64) @ J.T
    return 0.5 * (cov + cov.T)


def map_to_odom(T_map_cam: np.ndarray, T_odom_cam: np.ndarray) -> np.ndarray:
    """``T_map_odom`` such that map->odom->camera reproduces the localized camera pose (REP 105)."""
    return np.asarray(T_map_cam, dtype=np.float64) @ invert(np.asarray(T_odom_cam, dtype=np.float64))


# --- Camera info and images ----------------------------------------------------------------------

@dataclass(frozen=True)
class CameraModel:
    """What the node takes from a sensor_msgs/CameraInfo: pinhole intrinsics and lens distortion."""

    intrinsics: Intrinsics
    distortion_model: str
    D: tuple[float, ...]  # coefficients in the model's order; () or all zero = none
    frame_id: str = ""

    @property
    def distorted(self) -> bool:
        return any(abs(d) > 0.0 for d in self.D)

    @property
    def fisheye(self) -> bool:
        """Whether ``D`` is of OpenCV's fisheye model (ROS's equidistant) rather than plumb_bob's."""
        return self.distortion_model == "equidistant"


DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "equidistant")


def camera_model_from_info(msg, rectified: bool = False) -> CameraModel:
    """Intrinsics and distortion of a CameraInfo; ValueError saying why when the message is unusable.

    ``rectified``: the images are already rectified (``image_rect``), so the
    intrinsics are P's left 3x3 and the distortion is ignored.
    Binning and region of interest are refused (they change the intrinsics).
    """
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    if rectified:
        P = np.asarray(msg.p, dtype=np.float64).reshape(3, 4)
        K = P[:, :3]
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        which = "P" if rectified else "K"
        raise ValueError(f"camera_info {which} has no valid focal lengths (fx={K[0, 0]}, fy={K[1, 1]}): "
                         "is the camera calibrated?")
    if int(msg.binning_x) > 1 or int(msg.binning_y) > 1:
        raise ValueError(f"camera_info binning {msg.binning_x}x{msg.binning_y} is not supported; "
                         "publish full-resolution images with their own calibration")
    roi = msg.roi
    if int(roi.width) and int(roi.height) and (int(roi.width), int(roi.height)) != (int(msg.width), int(msg.height)):
        raise ValueError(f"camera_info region of interest {roi.width}x{roi.height}+{roi.x_offset}+{roi.y_offset} "
                         "is not supported; publish full frames")
    if int(msg.width) <= 0 or int(msg.height) <= 0:
        raise ValueError(f"camera_info image size {msg.width}x{msg.height} px is empty")
    D = tuple(float(d) for d in msg.d)
    if not all(np.isfinite(D)):
        raise ValueError(f"camera_info distortion has NaN/inf: {D}")
    model = msg.distortion_model or ("plumb_bob" if D else "")
    if rectified:
        D = ()
    if any(D) and model not in DISTORTION_MODELS:
        raise ValueError(f"camera_info distortion model {model!r} is not supported; "
                         f"supported: {', '.join(DISTORTION_MODELS)}")
    intrinsics = Intrinsics.from_K(K, int(msg.width), int(msg.height))
    return CameraModel(intrinsics, model, D, msg.header.frame_id)


def _to_uint8(image: np.ndarray, encoding: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # Full-range 16-bit grey (mono16) to 8 bits.
        return (image >> 8).astype(np.uint8)
    raise ValueError(f"image encoding {encoding!r} ({image.dtype}) is not an intensity image; "
                     "send rgb8, bgr8, mono8 or mono16")


def image_to_array(msg) -> np.ndarray:
    """sensor_msgs/Image -> uint8 RGB HxWx3 or grey HxW (``aceg_ros.image_codec``); ValueError if unusable."""
    from aceg_ros.image_codec import decode_image

    image = decode_image(msg.encoding, int(msg.height), int(msg.width), int(msg.step), bytes(msg.data),
                         bool(msg.is_bigendian))
    return _to_uint8(image, msg.encoding)


def compressed_to_array(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> uint8 RGB HxWx3 or grey HxW; ValueError if unusable."""
    from aceg_ros.image_codec import decode_compressed

    return _to_uint8(decode_compressed(msg.format, bytes(msg.data)), msg.format)


# --- Point clouds ------------------------------------------------------------------------------

def pack_rgb(rgb_N3: np.ndarray) -> np.ndarray:
    """uint8 RGB -> the float32 ``rgb`` field RViz and PCL read (0x00RRGGBB reinterpreted as float)."""
    rgb = np.asarray(rgb_N3, dtype=np.uint32)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return packed.astype(np.uint32).view(np.float32)


def point_cloud_xyzrgb(points_N3: np.ndarray, rgb_N3: np.ndarray, frame_id: str, stamp: TimeMsg) -> PointCloud2:
    """An unordered PointCloud2 with float32 x, y, z (m) and packed rgb."""
    n = len(points_N3)
    cloud = np.zeros(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
    if n:
        cloud["x"], cloud["y"], cloud["z"] = (np.asarray(points_N3, dtype=np.float32)[:, i] for i in range(3))
        cloud["rgb"] = pack_rgb(rgb_N3)
    msg = PointCloud2()
    msg.header.frame_id, msg.header.stamp = frame_id, stamp
    msg.height, msg.width = 1, n
    msg.fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, name in enumerate(("x", "y", "z", "rgb"))]
    msg.is_bigendian, msg.point_step, msg.row_step, msg.is_dense = False, 16, 16 * n, True
    msg.data = cloud.tobytes()
    return msg


def point_cloud_to_arrays(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`point_cloud_xyzrgb`: (points_N3 float32, rgb_N3 uint8)."""
    cloud = np.frombuffer(bytes(msg.data), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
    packed = cloud["rgb"].view(np.uint32)
    rgb = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=1).astype(np.uint8)
    return np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1), rgb
