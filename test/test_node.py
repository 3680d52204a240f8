"""The aceg_localizer node over real DDS, in the test process: poses, TF, QoS, lifecycle, bad input.

The node runs in a MultiThreadedExecutor on a background thread; a probe node
publishes real Image / CameraInfo messages and subscribes to what the node
publishes. For poses that can be checked against ground truth, the localizer
gets an *oracle* scene head: a lookup from the encoder features of a few known
renders of a textured plane to their exact scene coordinates. The network, the
uncertainty prefilter, PnP and the covariance are the real ``aceg_model`` code;
only the head is replaced, so these tests check the node (conversions, frames,
stamps, QoS, threading), not the model's accuracy.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
import cv2  # noqa: E402
import torch  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from nav_msgs.msg import Path as PathMsg  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from aceg_model.frames import Intrinsics  # noqa: E402
from aceg_model.geometry import make_pose, pose_error  # noqa: E402
from aceg_model.lens import ImageUndistorter  # noqa: E402
from aceg_model.localizer import Localizer  # noqa: E402
from aceg_model.mapping import SceneMap  # noqa: E402
from aceg_model.model import AcegModel  # noqa: E402
from aceg_model.pnp import PnPConfig  # noqa: E402
from aceg_ros import params as P  # noqa: E402
from aceg_ros import ros_conversions as rc  # noqa: E402
from aceg_ros.image_codec import encode_compressed, encode_image  # noqa: E402
from aceg_ros.localizer_node import AcegLocalizer, LatestSlot, VoxelCloud  # noqa: E402
from aceg_ros.spinning import spin  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]
W, H = 640, 480
INTRINSICS = Intrinsics(500.0, 500.0, 319.5, 239.5, W, H)
PLANE_X = 4.0  # the scene: a textured wall at x = 4 m in the map frame, facing -x
TEXTURE_M = 6.0  # the texture covers y, z in [-3, 3] m


# --- the synthetic scene -------------------------------------------------------------------------

def texture(seed: int = 0, size: int = 1024) -> np.ndarray:
    """A colourful, blob-textured wall: every patch looks different, so features are distinct."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    tex = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return cv2.addWeighted(tex, 0.7, rng.integers(0, 256, (size, size, 3), dtype=np.uint8), 0.3, 0)


def camera_pose(yaw_deg: float, pitch_deg: float, t_xyz) -> np.ndarray:
    """T_map_cam of an optical camera looking roughly along map +x (REP 103: optical z = forward)."""
    R = Rotation.from_euler("zy", [yaw_deg, pitch_deg], degrees=True).as_matrix() @ rc.R_BODY_OPTICAL
    return make_pose(R, t_xyz)


def wall_points(T_map_cam: np.ndarray, pixels_N2: np.ndarray, K: Intrinsics) -> np.ndarray:
    """Map-frame points on the wall seen at ``pixels_N2`` (ray-plane intersection)."""
    rays_N3 = np.stack([(pixels_N2[:, 0] - K.cx) / K.fx, (pixels_N2[:, 1] - K.cy) / K.fy,
                        np.ones(len(pixels_N2))], axis=1) @ T_map_cam[:3, :3].T
    s_N = (PLANE_X - T_map_cam[0, 3]) / rays_N3[:, 0]
    return T_map_cam[:3, 3] + s_N[:, None] * rays_N3


def render(T_map_cam: np.ndarray, tex: np.ndarray, K: Intrinsics = INTRINSICS) -> np.ndarray:
    """RGB image of the wall from ``T_map_cam`` (exact per-pixel ray casting + bilinear texture lookup)."""
    u, v = np.meshgrid(np.arange(K.width), np.arange(K.height))
    pts = wall_points(T_map_cam, np.stack([u.ravel(), v.ravel()], axis=1).astype(np.float64), K)
    n = tex.shape[0]
    map_x = ((pts[:, 1] + TEXTURE_M / 2) / TEXTURE_M * n).reshape(K.height, K.width).astype(np.float32)
    map_y = ((TEXTURE_M / 2 - pts[:, 2]) / TEXTURE_M * n).reshape(K.height, K.width).astype(np.float32)
    return cv2.remap(tex, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


class OracleHead(torch.nn.Module):
    """Scene head for tests: nearest registered feature -> its true scene coordinate.

    Uncertainty is the feature distance, so the registered views are certain
    and anything else is not.
    """

    method = "aceg"

    def __init__(self) -> None:
        super().__init__()
        self.feats = torch.zeros(0, 1)
        self.coords = torch.zeros(0, 3)

    def register(self, feats_NF: torch.Tensor, coords_N3: np.ndarray) -> None:
        feats = feats_NF.detach().float()
        self.feats = feats if len(self.feats) == 0 else torch.cat([self.feats, feats])
        self.coords = torch.cat([self.coords, torch.as_tensor(coords_N3, dtype=torch.float32)])

    def forward(self, feats_bF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist_b, idx_b = torch.cdist(feats_bF.float(), self.feats).min(dim=1)
        return self.coords[idx_b], torch.log(dist_b + 1e-3)


class _Recorder(torch.nn.Module):
    method = "aceg"

    def forward(self, feats_bF):
        self.feats = feats_bF.clone()
        return torch.zeros(len(feats_bF), 3), torch.zeros(len(feats_bF))


@dataclass
class Scene:
    model: AcegModel
    localizer: Localizer
    images: list[np.ndarray]
    poses: list[np.ndarray]


def make_scene(n_views: int = 3, seed: int = 0) -> Scene:
    """A random-init model, renders of the wall from ``n_views`` poses, and a localizer that knows them."""
    torch.manual_seed(seed)
    model = AcegModel().eval()
    tex = texture(seed)
    poses = [camera_pose(6.0 * i - 6.0, 3.0 * (i % 2), [0.1 * i, 0.2 - 0.15 * i, 0.05 * i]) for i in range(n_views)]
    images = [render(T, tex) for T in poses]
    return Scene(model, oracle_localizer(model, images, poses, INTRINSICS), images, poses)


def oracle_localizer(model: AcegModel, images: list[np.ndarray], poses: list[np.ndarray], K: Intrinsics,
                     pnp: PnPConfig | None = None, name: str = "test wall") -> Localizer:
    """A real Localizer whose scene head returns the exact wall points of the registered views' patches."""
    head, recorder = OracleHead(), _Recorder()
    probe = Localizer(model, SceneMap(recorder, np.zeros(3), {}))
    for image, T in zip(images, poses):
        _, _, pixels_P2, _, _ = probe.regress(image, K)
        head.register(recorder.feats, wall_points(T, pixels_P2, K))
    return Localizer(model, SceneMap(head, np.zeros(3), {"scene": name}), pnp or PnPConfig())


# --- messages ----------------------------------------------------------------------------------

def camera_info_msg(K: Intrinsics = INTRINSICS, frame_id: str = "cam_optical", D=(0.0,) * 5) -> CameraInfo:
    msg = CameraInfo()
    msg.header.frame_id, msg.width, msg.height = frame_id, K.width, K.height
    msg.distortion_model, msg.d = "plumb_bob", [float(d) for d in D]
    msg.k = [K.fx, 0.0, K.cx, 0.0, K.fy, K.cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [K.fx, 0.0, K.cx, 0.0, 0.0, K.fy, K.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def image_msg(image: np.ndarray, stamp_ns: int, encoding: str = "rgb8", frame_id: str = "cam_optical") -> Image:
    h, w, step, data = encode_image(image, encoding)
    msg = Image(height=h, width=w, encoding=encoding, step=step, data=data)
    msg.header.frame_id, msg.header.stamp = frame_id, rc.ns_to_stamp(stamp_ns)
    return msg


def compressed_msg(image: np.ndarray, stamp_ns: int, fmt: str = "png") -> CompressedImage:
    form, data = encode_compressed(image, fmt)
    msg = CompressedImage(format=form, data=data)
    msg.header.frame_id, msg.header.stamp = "cam_optical", rc.ns_to_stamp(stamp_ns)
    return msg


# --- the harness -------------------------------------------------------------------------------

class Harness:
    """The node under test and a probe node, spun by one MultiThreadedExecutor on a background thread."""

    def __init__(self, localizer=None, overrides: dict | None = None, activate: bool = True, **node_kwargs) -> None:
        params = {"points.period": 0.0, "diagnostics_period": 0.2, **(overrides or {})}
        self.node = AcegLocalizer(namespace="aceg", localizer=localizer,
                                  parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
                                  **node_kwargs)
        self.probe = rclpy.create_node(f"aceg_test_probe_{id(self):x}")
        self.got: dict[str, list] = {k: [] for k in ("pose", "tf", "path", "points", "diag", "progress")}
        self._lock = threading.Lock()
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        for key, typ, topic, qos in (("pose", PoseWithCovarianceStamped, "/aceg/pose", latched),
                                     ("tf", TFMessage, "/tf", 100), ("path", PathMsg, "/aceg/path", latched),
                                     ("points", PointCloud2, "/aceg/map_points", latched),
                                     ("diag", DiagnosticArray, "/diagnostics", 50)):
            self.probe.create_subscription(typ, topic, self._collector(key), qos)
        self.pub_image = self.probe.create_publisher(Image, "/aceg/image", qos_profile_sensor_data)
        self.pub_compressed = self.probe.create_publisher(CompressedImage, "/aceg/image/compressed",
                                                          qos_profile_sensor_data)
        self.pub_info = self.probe.create_publisher(CameraInfo, "/aceg/camera_info", qos_profile_sensor_data)
        self.executor = MultiThreadedExecutor(num_threads=4)
        self.executor.add_node(self.node)
        self.executor.add_node(self.probe)
        self._thread = threading.Thread(target=spin, args=(self.executor,), daemon=True)
        self._thread.start()
        if activate:
            assert self.node.trigger_configure() == P_SUCCESS
            assert self.node.trigger_activate() == P_SUCCESS

    def _collector(self, key):
        def cb(msg):
            with self._lock:
                self.got[key].append(msg)
        return cb

    def messages(self, key: str) -> list:
        with self._lock:
            return list(self.got[key])

    def wait_for(self, predicate, timeout: float = 15.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def send(self, image_msg_or_compressed, info: CameraInfo | None = None, until=None, timeout: float = 15.0,
             period: float = 0.5):
        """Publish camera_info + image, re-sending every ``period`` s until ``until()`` holds."""
        pub = self.pub_compressed if isinstance(image_msg_or_compressed, CompressedImage) else self.pub_image
        deadline = time.monotonic() + timeout
        while True:
            if info is not None:
                self.pub_info.publish(info)
                time.sleep(0.02)
            pub.publish(image_msg_or_compressed)
            t_end = min(time.monotonic() + period, deadline)
            while time.monotonic() < t_end:
                if until is None:
                    return None
                result = until()
                if result:
                    return result
                time.sleep(0.02)
            if time.monotonic() >= deadline:
                raise AssertionError(f"no result within {timeout} s")

    def poses_at(self, stamp_ns: int) -> list[PoseWithCovarianceStamped]:
        return [m for m in self.messages("pose") if rc.stamp_to_ns(m.header.stamp) == stamp_ns]

    def tf_at(self, parent: str, child: str, stamp_ns: int | None = None) -> list:
        return [t for m in self.messages("tf") for t in m.transforms
                if t.header.frame_id == parent and t.child_frame_id == child
                and (stamp_ns is None or rc.stamp_to_ns(t.header.stamp) == stamp_ns)]

    def last_diag(self, name_suffix: str = "localization"):
        for arr in reversed(self.messages("diag")):
            for s in arr.status:
                if s.name.endswith(name_suffix):
                    return s, {kv.key: kv.value for kv in s.values}
        return None

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self._thread.join(timeout=5.0)
        self.node.close()
        self.probe.destroy_node()


from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402

P_SUCCESS = TransitionCallbackReturn.SUCCESS
P_FAILURE = TransitionCallbackReturn.FAILURE


@pytest.fixture(scope="module")
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


@pytest.fixture(scope="module")
def scene() -> Scene:
    return make_scene()


@pytest.fixture
def harness(ros, scene):
    made: list[Harness] = []

    def make(**kw) -> Harness:
        kw.setdefault("localizer", scene.localizer)
        h = Harness(**kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


STAMP0 = 1_700_000_000 * 10**9  # a realistic epoch stamp, ns


def assert_pose_matches(msg: PoseWithCovarianceStamped, T_gt: np.ndarray, stamp_ns: int, frame: str = "map"):
    assert msg.header.frame_id == frame
    assert rc.stamp_to_ns(msg.header.stamp) == stamp_ns, "the pose must carry the image stamp"
    dt, dr = pose_error(rc.pose_to_matrix(msg.pose.pose), T_gt)
    assert dt < 0.005 and dr < 0.2, f"pose off by {dt * 100:.2f} cm, {dr:.3f} deg"
    cov = np.asarray(msg.pose.covariance).reshape(6, 6)
    assert np.all(np.isfinite(cov)) and np.any(cov != 0), "covariance must be finite and never all zeros"
    assert np.allclose(cov, cov.T), "covariance must be symmetric"
    assert np.all(np.diag(cov) > 0)
    assert np.all(np.linalg.eigvalsh(cov) > -1e-12), "covariance must be positive semi-definite"


# --- tests: unit pieces (no DDS) ------------------------------------------------------------------

def test_latest_slot_keeps_only_the_newest() -> None:
    slot = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True and slot.put(3) is True
    assert slot.replaced == 2
    assert slot.take(0.0) == 3 and slot.take(0.0) is None
    slot.close()
    t0 = time.monotonic()
    assert slot.take(5.0) is None and time.monotonic() - t0 < 1.0, "a closed slot never blocks"


def test_voxel_cloud_is_bounded_and_downsampled() -> None:
    cloud = VoxelCloud()
    pts = np.array([[0.001, 0, 0], [0.002, 0, 0], [0.5, 0, 0], [1.0, 0, 0]])
    cloud.add(pts, np.full((4, 3), 7, np.uint8), voxel=0.1, max_points=2)
    p, c = cloud.arrays()
    assert len(cloud) == 2 and np.allclose(p[:, 0], [0.5, 1.0]), "first two share a voxel, the oldest is dropped"
    msg = rc.point_cloud_xyzrgb(p, c, "map", rc.ns_to_stamp(5))
    p2, c2 = rc.point_cloud_to_arrays(msg)
    assert np.allclose(p2, p) and np.array_equal(c2, c) and msg.point_step == 16


def test_pose_covariance_and_tf_conversions_round_trip() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        T = make_pose(Rotation.random(random_state=rng).as_matrix(), rng.normal(size=3))
        assert np.allclose(rc.pose_to_matrix(rc.matrix_to_pose(T)), T, atol=1e-9)
        assert np.allclose(rc.transform_to_matrix(rc.matrix_to_transform(T)), T, atol=1e-9)
        A = rng.normal(size=(6, 6))
        msg = rc.pose_with_covariance(T, A @ A.T, "map", rc.ns_to_stamp(STAMP0 + 123))
        assert np.allclose(np.asarray(msg.pose.covariance).reshape(6, 6), A @ A.T)
        assert rc.stamp_to_ns(msg.header.stamp) == STAMP0 + 123
    with pytest.raises(ValueError, match="NaN"):
        rc.check_covariance(np.full((6, 6), np.nan))
    floored = rc.check_covariance(np.zeros((6, 6)))
    assert np.all(np.diag(floored) > 0), "a zero covariance is never published as zero"
    assert rc.stamp_to_ns(rc.stamp_plus(rc.ns_to_stamp(STAMP0), 0.25)) == STAMP0 + 250_000_000


def test_optical_frame_convention() -> None:
    # REP 103: optical z (forward) is body x, optical x (right) is body -y, optical y (down) is body -z.
    assert np.allclose(rc.R_BODY_OPTICAL @ [0, 0, 1], [1, 0, 0])
    assert np.allclose(rc.R_BODY_OPTICAL @ [1, 0, 0], [0, -1, 0])
    assert np.allclose(rc.R_BODY_OPTICAL @ [0, 1, 0], [0, 0, -1])
    assert np.isclose(np.linalg.det(rc.R_BODY_OPTICAL), 1.0)


def test_map_to_odom_and_attached_frame_covariance() -> None:
    rng = np.random.default_rng(2)
    T_map_cam = make_pose(Rotation.random(random_state=rng).as_matrix(), rng.normal(size=3))
    T_odom_cam = make_pose(Rotation.random(random_state=rng).as_matrix(), rng.normal(size=3))
    T_map_odom = rc.map_to_odom(T_map_cam, T_odom_cam)
    assert np.allclose(T_map_odom @ T_odom_cam, T_map_cam), "map->odom->camera must reproduce the camera pose"
    # The attached-frame covariance against sampling: perturb the camera (left, map axes), move the base along.
    T_cam_base = make_pose(Rotation.random(random_state=rng).as_matrix(), [0.3, -0.2, 0.5])
    L = np.diag([0.02, 0.03, 0.01, 0.01, 0.02, 0.015])
    cov_cam = L @ L
    samples = []
    for d in rng.multivariate_normal(np.zeros(6), cov_cam, size=20000):
        Tc = make_pose(Rotation.from_rotvec(d[3:]).as_matrix() @ T_map_cam[:3, :3], T_map_cam[:3, 3] + d[:3])
        Tb = Tc @ T_cam_base
        T_map_base = T_map_cam @ T_cam_base
        dtheta = Rotation.from_matrix(Tb[:3, :3] @ T_map_base[:3, :3].T).as_rotvec()
        samples.append(np.concatenate([Tb[:3, 3] - T_map_base[:3, 3], dtheta]))
    empirical = np.cov(np.asarray(samples).T)
    predicted = rc.covariance_of_attached_frame(cov_cam, T_map_cam, T_map_cam @ T_cam_base)
    assert np.allclose(predicted, empirical, atol=2e-5), np.abs(predicted - empirical).max()


def test_camera_info_checks() -> None:
    cam = rc.camera_model_from_info(camera_info_msg())
    assert cam.intrinsics == INTRINSICS and not cam.distorted
    bad = camera_info_msg()
    bad.k = [0.0] * 9
    with pytest.raises(ValueError, match="focal"):
        rc.camera_model_from_info(bad)
    binned = camera_info_msg()
    binned.binning_x = 2
    with pytest.raises(ValueError, match="binning"):
        rc.camera_model_from_info(binned)
    odd = camera_info_msg(D=(0.1, 0, 0, 0, 0))
    odd.distortion_model = "kannala_brandt_custom"
    with pytest.raises(ValueError, match="not supported"):
        rc.camera_model_from_info(odd)
    rect = camera_info_msg(D=(0.1, 0.01, 0, 0, 0))
    assert rc.camera_model_from_info(rect).distorted
    assert not rc.camera_model_from_info(rect, rectified=True).distorted


def distorted_view(image: np.ndarray, D, model: str = "plumb_bob") -> np.ndarray:
    """``image`` (a pinhole camera with ``INTRINSICS``) as a lens with OpenCV's ``model`` and ``D`` shows it."""
    K, pixels = INTRINSICS.K, np.stack(np.meshgrid(np.arange(W), np.arange(H)), -1).reshape(-1, 1, 2).astype(np.float32)
    if model == "equidistant":
        undist_pts = cv2.fisheye.undistortPoints(pixels, K, np.array(D), P=K)[:, 0]
    else:
        undist_pts = cv2.undistortPoints(pixels, K, np.array(D), P=K)[:, 0]
    return cv2.remap(image, undist_pts[:, 0].reshape(H, W), undist_pts[:, 1].reshape(H, W), cv2.INTER_LINEAR)


@pytest.mark.parametrize("model, D", [("plumb_bob", (-0.2, 0.05, 0.0, 0.0, 0.0)),
                                      ("equidistant", (0.05, -0.02, 0.0, 0.0))])
def test_undistorter_inverts_opencv_distortion(scene, model, D) -> None:
    # Distort a render with OpenCV's model, undistort it as the node does, compare the centre.
    sharp = cv2.GaussianBlur(scene.images[0], (0, 0), 2.0)  # band-limited, so resampling twice is exact enough
    distorted = distorted_view(sharp, D, model)
    info = camera_info_msg(D=D)
    info.distortion_model = model
    cam = rc.camera_model_from_info(info)
    assert cam.fisheye == (model == "equidistant")
    restored = ImageUndistorter()(distorted, cam.intrinsics, cam.D, cam.fisheye)
    centre = (slice(60, 420), slice(80, 560))

    def err(a):
        return np.abs(a[centre].astype(float) - sharp[centre].astype(float)).mean()
    assert err(restored) < 2.0 and err(restored) < 0.2 * err(distorted), (err(restored), err(distorted))
    if cam.fisheye:
        with pytest.raises(ValueError, match="needs 4 coefficients"):
            ImageUndistorter()(distorted, cam.intrinsics, cam.D[:3], fisheye=True)


def test_every_pnp_parameter_reaches_the_localizer_config() -> None:
    """Each ``pnp.*`` parameter set away from its default arrives in its ``PnPConfig`` field."""
    for name, field in P._PNP_FIELDS.items():
        default = P.SPECS[name].default
        if isinstance(default, bool):
            value = not default
        elif isinstance(default, int):
            value = default + 1
        else:
            value = 0.5 * default if default > 0 else 0.25
        assert getattr(P.pnp_config({name: value}), field) == value, name


def test_parameter_table_matches_yaml() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((REPO / "config" / "aceg.yaml").read_text())
    values = doc["/**"]["ros__parameters"] if "/**" in doc else doc["aceg"]["aceg_localizer"]["ros__parameters"]

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)])
    flat_values = dict(flat(values))
    assert set(flat_values) == set(P.SPECS), "config/aceg.yaml must list exactly the declared parameters"
    for name, value in flat_values.items():
        assert value == P.SPECS[name].default and type(value) is type(P.SPECS[name].default), name
    # Every key is commented: the line above it is a comment, saying its default.
    lines = (REPO / "config" / "aceg.yaml").read_text().splitlines()
    for k, line in enumerate(lines):
        key = line.strip().split(":")[0]
        if line.strip() and not line.strip().startswith("#") and f"{key}" in {n.split(".")[-1] for n in P.SPECS} \
                and not line.strip().endswith(":"):
            assert lines[k - 1].strip().startswith("#"), f"config/aceg.yaml: {key} has no comment above it"
            comment = "\n".join(ln for ln in lines[max(0, k - 6):k] if ln.strip().startswith("#"))
            assert "Default" in comment, f"config/aceg.yaml: the comment of {key} does not give its default"


# --- tests: the node over DDS -----------------------------------------------------------------------

def test_pose_and_tf_match_ground_truth(harness, scene) -> None:
    h = harness(overrides={"camera_frame": "aceg_cam", "points.period": 0.5})
    info = camera_info_msg()
    for i, (image, T_gt) in enumerate(zip(scene.images, scene.poses)):
        stamp = STAMP0 + i * 10**8
        h.send(image_msg(image, stamp), info, until=lambda s=stamp: h.poses_at(s))
        assert_pose_matches(h.poses_at(stamp)[0], T_gt, stamp)
        tf = h.wait_for(lambda s=stamp: h.tf_at("map", "aceg_cam", s), what="map->aceg_cam on /tf")[0]
        T_tf = rc.transform_to_matrix(tf.transform)
        dt, dr = pose_error(T_tf, T_gt)
        assert dt < 0.005 and dr < 0.2
        # REP 103 optical frame: the camera's z axis is its viewing direction, here towards the wall (+x).
        assert T_tf[:3, :3] @ np.array([0, 0, 1.0]) @ np.array([1.0, 0, 0]) > 0.98
    path = h.wait_for(lambda: [m for m in h.messages("path") if len(m.poses) == len(scene.poses)], what="path")[-1]
    assert path.header.frame_id == "map"
    assert [rc.stamp_to_ns(p.header.stamp) for p in path.poses] == [STAMP0 + i * 10**8 for i in range(3)]
    cloud = h.wait_for(lambda: [m for m in h.messages("points") if m.width > 100], what="map points")[-1]
    pts, rgb = rc.point_cloud_to_arrays(cloud)
    assert cloud.header.frame_id == "map" and np.allclose(pts[:, 0], PLANE_X, atol=1e-3), "points lie on the wall"
    assert rgb.std() > 10, "points carry the image colours"

    # Latched like amcl_pose: a subscriber that joins late still gets the last pose.
    late: list = []
    qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    h.probe.create_subscription(PoseWithCovarianceStamped, "/aceg/pose", late.append, qos)
    h.wait_for(lambda: late, what="the latched pose for a late subscriber")
    assert rc.stamp_to_ns(late[0].header.stamp) == STAMP0 + 2 * 10**8

    status, values = h.wait_for(lambda: (d := h.last_diag()) and d[1]["frames_localized"] == "3" and d,
                                what="diagnostics with 3 localized frames")
    assert values["map_loaded"] == "true" and int(values["last_inliers"]) >= 100
    for stage in ("decode", "encoder", "regressor", "pnp_ransac", "node_total", "since_received"):
        assert float(values[f"latency_ms_{stage}"]) > 0, stage


def test_compressed_grey_and_bgr_inputs(harness, scene) -> None:
    h = harness(overrides={"image_transport": "compressed"})
    stamp = STAMP0 + 7
    h.send(compressed_msg(scene.images[1], stamp, "png"), camera_info_msg(), until=lambda: h.poses_at(stamp))
    assert_pose_matches(h.poses_at(stamp)[0], scene.poses[1], stamp)
    h2 = harness(overrides={})
    stamp = STAMP0 + 8
    h2.send(image_msg(scene.images[2], stamp, "bgr8"), camera_info_msg(), until=lambda: h2.poses_at(stamp))
    assert_pose_matches(h2.poses_at(stamp)[0], scene.poses[2], stamp)


class _SlowLocalizer:
    """Wraps a localizer and makes each frame take at least ``delay`` seconds."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.calls = inner, delay, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def localize(self, image, intrinsics):
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.localize(image, intrinsics)


def test_newest_frame_only_when_behind(harness, scene) -> None:
    slow = _SlowLocalizer(scene.localizer, 0.4)
    h = harness(localizer=slow)
    info = camera_info_msg()
    first = STAMP0 + 10**9
    h.send(image_msg(scene.images[0], first), info, until=lambda: h.poses_at(first))  # connected, warm
    n = 15
    stamps = [first + (k + 1) * 10**7 for k in range(n)]
    for s in stamps:  # a burst far faster than the localizer
        h.pub_image.publish(image_msg(scene.images[0], s))
        time.sleep(0.01)
    last = stamps[-1]
    h.wait_for(lambda: h.poses_at(last), what="a pose for the newest frame of the burst")
    time.sleep(0.5)
    got = {rc.stamp_to_ns(m.header.stamp) for m in h.messages("pose")} & set(stamps)
    assert len(got) < n / 2, f"{len(got)} of {n} frames processed: frames were queued, not dropped"
    _, values = h.wait_for(lambda: (d := h.last_diag()) and int(d[1]["frames_dropped_newest_only"]) > 0 and d,
                           what="dropped-frame count in diagnostics")
    received = int(values["frames_received"])
    assert int(values["frames_dropped_newest_only"]) + int(values["frames_processed"]) <= received


def test_bad_messages_are_dropped_not_fatal(harness, scene) -> None:
    h = harness()
    info = camera_info_msg()
    # An image before any camera_info, then camera_info.
    h.send(image_msg(scene.images[0], STAMP0 + 1), None,
           until=lambda: (d := h.last_diag()) and "rejected_no_camera_info" in d[1])
    bad_info = camera_info_msg()
    bad_info.k = [0.0] * 9
    h.send(image_msg(scene.images[0], STAMP0 + 2), bad_info,
           until=lambda: (d := h.last_diag()) and "bad camera_info" in d[1]["last_rejection"])
    # Garbage payloads: unknown encoding, truncated data, a depth image, a size that disagrees with camera_info.
    weird = image_msg(scene.images[0], STAMP0 + 3)
    weird.encoding = "yuv422_weird"
    short = image_msg(scene.images[0], STAMP0 + 4)
    short.data = bytes(short.data[:1000])
    depth = Image(height=H, width=W, encoding="32FC1", step=W * 4, data=np.ones((H, W), np.float32).tobytes())
    small = image_msg(scene.images[0][:240, :320].copy(), STAMP0 + 5)

    def rejected() -> int:
        d = h.last_diag()
        return sum(int(v) for k, v in d[1].items() if k.startswith("rejected_")) if d else 0
    for msg in (weird, short, depth, small):  # one at a time, so none replaces another in the slot
        before = rejected()
        h.send(msg, info, until=lambda b=before: rejected() > b)
    _, values = h.wait_for(lambda: h.last_diag(), what="diagnostics")
    assert int(values["rejected_bad_image"]) >= 3 and int(values["rejected_size_mismatch"]) >= 1, values
    # Distortion with undistort off is refused with a reason.
    h.node.set_parameters([Parameter("undistort", value=False)])
    h.send(image_msg(scene.images[0], STAMP0 + 6), camera_info_msg(D=(-0.2, 0.05, 0, 0, 0)),
           until=lambda: (d := h.last_diag()) and "rejected_distorted" in d[1])
    # With undistort on (the default), a distorted view is undistorted and localized.
    h.node.set_parameters([Parameter("undistort", value=True)])
    lens = (-0.2, 0.05, 0.0, 0.0, 0.0)
    h.send(image_msg(distorted_view(scene.images[1], lens), STAMP0 + 9), camera_info_msg(D=lens),
           until=lambda: h.poses_at(STAMP0 + 9))
    assert_pose_matches(h.poses_at(STAMP0 + 9)[0], scene.poses[1], STAMP0 + 9)
    # An image the map does not know: refused by PnP, reported in diagnostics as WARN, not an exception.
    noise = np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
    h.send(image_msg(noise, STAMP0 + 7), info, until=lambda: (d := h.last_diag()) and "rejected_not_localized" in d[1])
    # Still alive and localizing.
    stamp = STAMP0 + 8
    h.send(image_msg(scene.images[2], stamp), info, until=lambda: h.poses_at(stamp))
    assert_pose_matches(h.poses_at(stamp)[0], scene.poses[2], stamp)
    assert not h.poses_at(STAMP0 + 7), "no pose for an image that did not localize"
    _, values = h.wait_for(lambda: h.last_diag(), what="diagnostics")
    assert "rejected_error" not in values, f"an internal error, not a clean refusal: {values['last_rejection']}"


def test_bad_parameters_are_refused(harness, scene) -> None:
    h = harness()
    for name, value, why in (("device", "tpu", "one of"), ("pnp.threshold_px", -1.0, "range"),
                             ("tf_mode", "map_to_moon", "one of"), ("pnp.min_inliers", 2, "range"),
                             ("map_frame", "/map", "frame id"), ("camera_frame", "map", "differ"),
                             ("pnp.threshold_px", "ten", "type"), ("autostart", False, "read-only"),
                             ("pnp.refine_window_px", 0, "range"), ("pnp.refine_pixels", "yes", "type"),
                             ("pnp.refined_threshold_px", 0.0, "range")):
        result = h.node.set_parameters([Parameter(name, value=value)])[0]
        assert not result.successful, (name, value)
        assert why in result.reason.lower() or why in result.reason, (name, result.reason)
    assert h.node.get_parameter("device").value == "auto"
    # Good values are applied at run time: a stricter PnP makes the localizer refuse.
    assert h.node.set_parameters([Parameter("pnp.min_inliers", value=100000)])[0].successful
    h.send(image_msg(scene.images[0], STAMP0 + 11), camera_info_msg(),
           until=lambda: (d := h.last_diag()) and "min_inliers=100000" in d[1]["last_rejection"])
    assert h.node.set_parameters([Parameter("pnp.min_inliers", value=100)])[0].successful
    stamp = STAMP0 + 12
    h.send(image_msg(scene.images[0], stamp), camera_info_msg(), until=lambda: h.poses_at(stamp))


def test_bad_start_up_values_raise_clearly(ros) -> None:
    from rclpy.exceptions import InvalidParameterValueException

    with pytest.raises(InvalidParameterValueException, match="one of"):
        AcegLocalizer(namespace="aceg", parameter_overrides=[Parameter("tf_mode", value="bogus")])


def test_configure_refuses_what_cannot_work(harness, scene, tmp_path) -> None:
    # map_to_odom needs TF lookups: refused at configure when tf2_ros is missing and none is injected.
    h = harness(overrides={"tf_mode": "map_to_odom"}, activate=False)
    if h.node._lookup is None and __import__("importlib").util.find_spec("tf2_ros") is None:
        assert h.node.trigger_configure() == P_FAILURE
    # A missing model or map file: refused with the path named (logged), node stays unconfigured.
    h2 = harness(localizer=None, overrides={"model_path": str(tmp_path / "nope.safetensors")}, activate=False)
    assert h2.node.trigger_configure() == P_FAILURE
    path = tmp_path / "model.safetensors"
    scene.model.save(path)
    h3 = harness(localizer=None, overrides={"model_path": str(path), "map_path": str(tmp_path / "nomap")},
                 activate=False)
    assert h3.node.trigger_configure() == P_FAILURE
    # No map at all is allowed (map later); diagnostics say so.
    h4 = harness(localizer=None, overrides={"model_path": str(path), "device": "cpu"})
    _, values = h4.wait_for(lambda: h4.last_diag(), what="diagnostics")
    assert values["map_loaded"] == "false"
    h4.send(image_msg(scene.images[0], STAMP0 + 20), camera_info_msg(),
            until=lambda: (d := h4.last_diag()) and "rejected_no_map" in d[1])


def test_lifecycle_transitions_over_ros_services(harness, scene) -> None:
    h = harness(activate=False)
    get_state = h.probe.create_client(GetState, "/aceg/aceg_localizer/get_state")
    change = h.probe.create_client(ChangeState, "/aceg/aceg_localizer/change_state")
    assert get_state.wait_for_service(timeout_sec=10.0) and change.wait_for_service(timeout_sec=10.0)

    def call(client, req):
        return h.wait_for(lambda f=client.call_async(req): f.done() and f.result(), what="service reply")

    def state() -> str:
        return call(get_state, GetState.Request()).current_state.label

    def transition(label: str) -> bool:
        req = ChangeState.Request()
        req.transition.label = label
        return call(change, req).success

    assert state() == "unconfigured"
    assert transition("configure") and state() == "inactive"
    h.send(image_msg(scene.images[0], STAMP0 + 30), camera_info_msg(), timeout=1.0, period=1.0, until=None)
    time.sleep(0.5)
    assert not h.poses_at(STAMP0 + 30), "an inactive node does not localize"
    assert transition("activate") and state() == "active"
    h.send(image_msg(scene.images[0], STAMP0 + 31), camera_info_msg(), until=lambda: h.poses_at(STAMP0 + 31))
    assert transition("deactivate") and state() == "inactive"
    h.send(image_msg(scene.images[1], STAMP0 + 32), camera_info_msg(), timeout=1.0, period=1.0, until=None)
    time.sleep(0.5)
    assert not h.poses_at(STAMP0 + 32), "a deactivated node stops publishing"
    assert transition("cleanup") and state() == "unconfigured"
    assert h.node._localizer is None and h.node._model is None, "cleanup releases the model and the map"
    assert transition("configure") and transition("activate")
    h.send(image_msg(scene.images[1], STAMP0 + 33), camera_info_msg(), until=lambda: h.poses_at(STAMP0 + 33))


def test_map_to_odom_with_injected_tf_and_base_pose(harness, scene) -> None:
    """map->odom (REP 105) stamped at image time + tolerance and re-sent on a timer; pose of base_link."""
    T_odom_cam = make_pose(Rotation.from_euler("z", 20, degrees=True).as_matrix() @ rc.R_BODY_OPTICAL, [1.0, 2.0, 0.3])
    T_cam_base = make_pose(rc.R_BODY_OPTICAL.T, [0.0, 0.2, -0.1])
    lookups: list = []

    def lookup(target, source, stamp, timeout):
        lookups.append((target, source, rc.stamp_to_ns(stamp)))
        if (target, source) == ("odom", "cam_optical"):
            return T_odom_cam
        if (target, source) == ("cam_optical", "base_link"):
            return T_cam_base
        return None

    h = harness(overrides={"tf_mode": "map_to_odom", "pose_frame": "base", "transform_tolerance": 0.3,
                           "tf_publish_rate": 20.0}, tf_lookup=lookup)
    stamp = STAMP0 + 5 * 10**9
    h.send(image_msg(scene.images[0], stamp), camera_info_msg(), until=lambda: h.poses_at(stamp))
    assert ("odom", "cam_optical", stamp) in lookups, "odom->camera is looked up at the image stamp"
    tol_ns = 300_000_000
    tf = h.wait_for(lambda: h.tf_at("map", "odom", stamp + tol_ns), what="map->odom at stamp + tolerance")[0]
    T_map_odom = rc.transform_to_matrix(tf.transform)
    dt, dr = pose_error(T_map_odom @ T_odom_cam, scene.poses[0])
    assert dt < 0.005 and dr < 0.2, "map->odom->camera reproduces the localized camera"
    # The pose is of base_link: the camera pose composed with camera->base.
    assert_pose_matches(h.poses_at(stamp)[0], scene.poses[0] @ T_cam_base, stamp)
    # Re-sent on the timer with advancing stamps (node clock + tolerance), never repeated.
    h.wait_for(lambda: len(h.tf_at("map", "odom")) >= 4, what="map->odom re-sent")
    stamps = [rc.stamp_to_ns(t.header.stamp) for t in h.tf_at("map", "odom")]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert not h.tf_at("map", "aceg_camera"), "no map->camera in map_to_odom mode"


def test_sim_time_drives_the_map_to_odom_stamps(harness, scene) -> None:
    """With use_sim_time, the re-sent map->odom is stamped from /clock (bag replay), not from the wall clock."""
    from rosgraph_msgs.msg import Clock as ClockMsg

    T_odom_cam = make_pose(rc.R_BODY_OPTICAL, [0.5, 0.0, 0.2])
    h = harness(overrides={"use_sim_time": True, "tf_mode": "map_to_odom", "transform_tolerance": 0.3,
                           "tf_publish_rate": 20.0},
                tf_lookup=lambda target, source, stamp, timeout: T_odom_cam)
    clock_pub = h.probe.create_publisher(ClockMsg, "/clock", 10)
    sim0 = 1000 * 10**9
    stamp = sim0 - 10**8  # the image was taken 0.1 s of sim time before the clock starts ticking
    h.send(image_msg(scene.images[0], stamp), camera_info_msg(), until=lambda: h.poses_at(stamp))
    tol = 300_000_000
    # The transform is published after the pose, so it may arrive a moment later.
    h.wait_for(lambda: h.tf_at("map", "odom", stamp + tol), what="map->odom stamped at the image stamp + tolerance")
    ticks = [sim0 + k * 50_000_000 for k in range(30)]
    for t in ticks:  # 1.5 s of sim time
        clock_pub.publish(ClockMsg(clock=rc.ns_to_stamp(t)))
        time.sleep(0.03)
    resent = [rc.stamp_to_ns(t.header.stamp) for t in h.tf_at("map", "odom")][1:]
    assert len(resent) >= 3, "re-sent on the timer while /clock advances"
    assert all(sim0 + tol <= s <= ticks[-1] + tol for s in resent), \
        f"stamps {[(s - sim0) / 1e9 for s in resent]} s are not /clock + tolerance"


def test_main_runs_with_params_file(ros, tmp_path, scene) -> None:
    """The console entry point with --ros-args --params-file: configures, activates, publishes, exits on shutdown."""
    import signal
    import subprocess
    import sys

    model = tmp_path / "model.safetensors"
    scene.model.save(model)
    params = tmp_path / "p.yaml"
    params.write_text(f"/**:\n  ros__parameters:\n    model_path: {model}\n    device: cpu\n"
                      "    diagnostics_period: 0.2\n")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from aceg_ros.localizer_node import main; "
                             "sys.exit(main())", "--ros-args", "--params-file", str(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        probe = rclpy.create_node("aceg_test_main_probe")
        got: list = []
        probe.create_subscription(DiagnosticArray, "/diagnostics", got.append, 10)
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline and proc.poll() is None:
            rclpy.spin_once(probe, timeout_sec=0.1)
        probe.destroy_node()
        assert got, "no diagnostics from the node started by main()"
        status = {s.name: s for s in got[0].status}["aceg_localizer: localization"]
        assert status.message == "no map loaded", "started without map_path: it says so"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean shutdown, exit status 0
        out = proc.communicate(timeout=20)[0]
    assert "active: localizing images from /aceg/image" in out, out
    assert proc.returncode == 0, out


def test_main_exits_with_a_clear_error_on_a_bad_value(tmp_path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import sys; from aceg_ros.localizer_node import main; "
                           "sys.exit(main())", "--ros-args", "-p", "device:=tpu"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "device must be one of" in proc.stdout + proc.stderr
