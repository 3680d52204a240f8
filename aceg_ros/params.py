"""Every parameter of the ``aceg_localizer`` node, declared and validated in one place.

Each entry of :data:`PARAMETERS` gives the default, the meaning with its unit,
the allowed values and when a change takes effect. The node declares them with
descriptors (``ros2 param describe`` shows all of it) and registers
:func:`check_parameters` as its on-set callback, so a bad value is refused with
a reason instead of raising inside the node. ``config/aceg.yaml`` lists the same
parameters with the same defaults (a test keeps the two in step).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult

from aceg_model.pnp import PnPConfig

TF_MODES = ("map_to_camera", "map_to_odom", "none")
POSE_FRAMES = ("camera", "base")
IMAGE_TRANSPORTS = ("raw", "compressed")
MAPPING_METHODS = ("aceg", "ace")

# When a change takes effect. "runtime": at once; "configure": at the next
# configure transition; "activate": at the next activate; "call": read when
# the service is called; "start-up": read-only, set it in the parameter file.
RUNTIME, CONFIGURE, ACTIVATE, CALL, STARTUP = "runtime", "configure", "activate", "call", "start-up"


@dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    description: str  # meaning, with the unit in brackets
    applies: str = RUNTIME
    choices: tuple[str, ...] = ()
    range: tuple[float, float] | None = None  # inclusive
    read_only: bool = False


PARAMETERS: tuple[Spec, ...] = (
    # Model, map and compute.
    Spec("model_path", "", "pre-trained model file (safetensors) [path]; '' = the shipped "
         "models/aceg_small.safetensors", CONFIGURE),
    Spec("map_path", "", "map file (safetensors) loaded at configure and by the load_map service [path]; "
         "'' = start without a map (then call map_scene or load_map)", CONFIGURE),
    Spec("device", "auto", "where the network runs: auto = CUDA when available, else CPU; cuda:N picks a GPU",
         CONFIGURE, choices=("auto", "cpu", "cuda")),
    # Input.
    Spec("image_transport", "raw", "raw: sensor_msgs/Image on 'image'; compressed: sensor_msgs/CompressedImage "
         "(jpeg/png) on 'image/compressed'", ACTIVATE, choices=IMAGE_TRANSPORTS),
    Spec("undistort", True, "undistort images whose camera_info has non-zero distortion (plumb_bob, "
         "rational_polynomial, equidistant); false = drop such frames with an error"),
    Spec("image_is_rectified", False, "the image topic is already rectified (image_rect): use the projection "
         "matrix P as intrinsics and ignore the distortion coefficients"),
    # Frames and TF.
    Spec("map_frame", "map", "fixed frame of the map; frame_id of the pose and parent of the TF"),
    Spec("odom_frame", "odom", "odometry frame; child of the map->odom TF in tf_mode map_to_odom (REP 105)"),
    Spec("base_frame", "base_link", "robot body frame; the pose is of this frame when pose_frame = base"),
    Spec("camera_frame", "aceg_camera", "child frame of the map->camera TF in tf_mode map_to_camera "
         "(OpenCV/REP 103 optical axes: x right, y down, z forward). A frame of its own by default, so it "
         "never gives a second parent to the robot's camera frame"),
    Spec("tf_mode", "map_to_camera", "map_to_camera: TF map->camera_frame at the image stamp; map_to_odom: "
         "TF map->odom from the pose and odom->camera looked up at the image stamp (needs tf2_ros); "
         "none: no TF", CONFIGURE, choices=TF_MODES),
    Spec("pose_frame", "camera", "frame whose pose is published: camera = the image's optical frame; "
         "base = base_frame, through the camera->base TF (needs tf2_ros)", CONFIGURE, choices=POSE_FRAMES),
    Spec("transform_tolerance", 1.0, "map->odom is stamped this far after the image stamp, so consumers "
         "can use it until the next update, as AMCL does [s]", range=(0.0, 10.0)),
    Spec("tf_publish_rate", 10.0, "rate at which the last map->odom is re-sent, stamped now + "
         "transform_tolerance; 0 = only on new poses [Hz]", ACTIVATE, range=(0.0, 100.0)),
    Spec("tf_lookup_timeout", 0.1, "how long a TF lookup (odom->camera, camera->base) at the image stamp "
         "may wait for the transform [s]", range=(0.0, 2.0)),
    # PnP (aceg_model.pnp.PnPConfig).
    Spec("pnp.threshold_px", 10.0, "RANSAC inlier threshold on the reprojection error, for a 480 px high "
         "image; scaled with the image height (see pnp.reference_height_px); for correspondences at patch "
         "centres (pnp.refine_pixels off, maps without fine keys) [px]", range=(0.1, 200.0)),
    Spec("pnp.refined_threshold_px", 8.0, "the same threshold for correspondences whose pixels were refined "
         "within their patches (pnp.refine_pixels, maps with fine keys) [px]", range=(0.1, 200.0)),
    Spec("pnp.reference_height_px", 480.0, "image height that pnp.threshold_px is given for; 0 = use "
         "pnp.threshold_px as is at any image size [px]", range=(0.0, 100_000.0)),
    Spec("pnp.min_inliers", 50, "refuse a pose with fewer inliers [count]", range=(4, 1_000_000)),
    Spec("pnp.top_k", 800, "keep the k most certain correspondences before RANSAC; 0 = all [count]",
         range=(0, 1_000_000)),
    Spec("pnp.max_uncertainty", 0.0, "drop correspondences whose predicted uncertainty exceeds this; "
         "0 = no threshold [m]", range=(0.0, 1000.0)),
    Spec("pnp.max_iterations", 10000, "RANSAC iteration cap (bounds the time of a refusal) [count]",
         range=(100, 1_000_000)),
    Spec("pnp.refine_pixels", True, "move each correspondence's pixel within its patch to where its landmark's "
         "fine key matches best, for maps that carry fine keys (mapped with mapping.sweep_scale >= 2); costs "
         "encoding the image again at the map's fine scale"),
    Spec("pnp.refine_window_px", 6, "how far the refinement searches around the patch centre, in pixels of "
         "the model's working resolution (240 px high) [px]", range=(1, 32)),
    Spec("pnp.refine_bf16", PnPConfig.refine_bf16, "run the refinement's fine encoding of the image under "
         "bfloat16 on a CPU (ignored on a GPU): about 40 ms less per 640x480 frame where the CPU has native bf16 "
         "instructions (avx512_bf16 or amx_bf16), slower where it emulates them"),
    Spec("pnp.photometric_refinement", True, "once a pose is accepted, place its inliers' landmarks by their grey "
         "windows (NCC) where the map carries them (mapped with mapping.photo_depth) and solve again"),
    Spec("pnp.solve_in_visit", True, "once a pose is accepted, solve again on the landmarks of the mapping visit "
         "nearest it, for maps that keep landmarks to visits (mapped with mapping.visit_window_s > 0)"),
    Spec("pnp.seed_ray_depth_sigma", PnPConfig.seed_ray_depth_sigma, "the final fit leaves each inlier landmark's "
         "depth along the ray of the mapping view it was seeded from uncertain by this fraction of the depth "
         "(maps that record their views); 0 = trust depths like rays [fraction]", range=(0.0, 1.0)),
    Spec("pnp.resolve_min_support", PnPConfig.resolve_min_support, "keep the accepting solve's pose where the "
         "re-solves (visit, photometric, seed rays) end on one that explains less than this share of its "
         "inliers; 0 = always take the re-solved pose [fraction]", range=(0.0, 1.0)),
    Spec("pnp.map_floor", True, "add the map's covariance floor (how its visits disagree, measured in mapping) "
         "to every pose's covariance, for maps that carry one"),
    # Outputs.
    Spec("path.max_poses", 1000, "length of the trajectory (nav_msgs/Path) on 'path'; 0 = no path [poses]",
         range=(0, 100_000)),
    Spec("points.period", 5.0, "how often the map point cloud on 'map_points' is extended from the latest "
         "localized frame (one extra regression); 0 = no cloud [s]", range=(0.0, 3600.0)),
    Spec("points.max_points", 50000, "size bound of the map point cloud (oldest voxels dropped) [points]",
         range=(100, 5_000_000)),
    Spec("points.max_sigma", 0.1, "only scene coordinates with a predicted uncertainty below this enter the "
         "cloud [m]", range=(0.001, 10.0)),
    Spec("points.voxel", 0.02, "voxel size of the cloud's downsampling [m]", range=(0.001, 1.0)),
    Spec("diagnostics_period", 1.0, "period of the status on /diagnostics [s]", CONFIGURE, range=(0.1, 60.0)),
    Spec("autostart", True, "main() configures and activates the node at start-up; false = wait for "
         "lifecycle transitions (nav2 lifecycle manager, ros2 lifecycle set)", STARTUP, read_only=True),
    # Mapping service (map_scene), read when the service is called.
    Spec("mapping.bag", "", "rosbag2 folder (sqlite3 or mcap) with images, camera_info and poses [path]", CALL),
    Spec("mapping.image_topic", "/camera/image_raw", "image topic in the bag (Image or CompressedImage)", CALL),
    Spec("mapping.camera_info_topic", "/camera/camera_info", "camera_info topic in the bag", CALL),
    Spec("mapping.pose_topic", "/camera/pose", "camera pose topic in the bag (PoseStamped, "
         "PoseWithCovarianceStamped, Odometry); '' = take poses from the bag's /tf", CALL),
    Spec("mapping.tf_parent", "map", "parent frame of the /tf chain used when mapping.pose_topic is ''", CALL),
    Spec("mapping.tf_child", "", "camera frame of the /tf chain; '' = the images' frame_id", CALL),
    Spec("mapping.max_pose_gap", 0.05, "largest time between an image and the pose samples it is "
         "interpolated from; farther images are dropped [s]", CALL, range=(0.0, 10.0)),
    Spec("mapping.output", "", "map file to write (atomically) [path]; '' = map_path", CALL),
    Spec("mapping.iterations", 300, "optimization iterations [count]", CALL, range=(1, 1_000_000)),
    Spec("mapping.batch_patches", 4096, "patches per optimization step (lower it if GPU memory is short) [count]",
         CALL, range=(64, 1_000_000)),
    Spec("mapping.sweep_scale", 3, "the plane sweep placing the landmarks compares the mapping images "
         "encoded at this multiple of the model's resolution: finer depths, but scale^2 the encoding time "
         "and memory (mapping 500 frames of 640x480 peaked at 2.7 GB at 3, 1.6 GB at 1); lower it if memory is short",
         CALL, range=(1, 4)),  # aceg_model.landmarks.MAX_SWEEP_SCALE, not imported: it would load torch here
    Spec("mapping.photo_depth", True, "sharpen the plane sweep's landmark depths by normalized "
         "cross-correlation of the mapping images' raw pixels, and keep each landmark's grey window in the map for pnp.photometric_refinement (about 20-25 s more per map on a 2-core CPU)",
         CALL),
    Spec("mapping.estimate_lens", True, "estimate the camera's radial lens distortion from the mapping "
         "images and their poses (epipolar agreement of SIFT matches), keep it only if it helps image pairs it "
         "was not fitted on, and remove it from mapping and query images; what camera_info's own distortion "
         "(see undistort) leaves, usually nothing (about 5-20 s per map with the mount; 16 s for 500 images of 640x480)", CALL),
    Spec("mapping.estimate_mount", True, "with mapping.estimate_lens, also estimate a fixed turn and offset of the "
         "camera from the frame the mapping poses describe (a mounting error), kept only if it helps image pairs "
         "it was not fitted on and both halves of the pairs find the same one; mapping then uses the camera's poses, "
         "and poses of that camera's queries are published for the frame the mapping poses described", CALL),
    Spec("mapping.check_poses", True, "compare the mapping poses with the images (SIFT matches of image pairs a "
         "moment apart against the poses' epipolar lines) and report the stretches where they disagree by more "
         "than 3 px; a report only (about 10 s for 500 images)", CALL),
    Spec("mapping.refine_poses", True, "correct the mapping poses from the mapping images before anything is "
         "triangulated from them: an epipolar bundle adjustment of SIFT-matched image pairs at 4-64 cm baselines, "
         "for poses from a tracker that are a few mm and a tenth of a degree off per image (about 1.5 min for 200 "
         "images of 640x480); kept only where they explain the matches at least 25 % better, so accurate poses "
         "are kept as given", CALL),
    Spec("mapping.visit_window_s", 10.0, "keep each landmark to the mapping images taken within this time of "
         "the image it was seeded in, so the pose drift between two visits of a place (tens of seconds apart) "
         "does not blur it; 0 = off [s]", CALL, range=(0.0, 86_400.0)),
    Spec("mapping.method", "aceg", "aceg = optimize map codes of the pre-trained regressor; ace = the "
         "per-scene MLP baseline", CALL, choices=MAPPING_METHODS),
)
SPECS: dict[str, Spec] = {s.name: s for s in PARAMETERS}

_FRAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
_TOPIC_RE = re.compile(r"^/?[A-Za-z_~{][A-Za-z0-9_/{}~]*$")
_FRAME_PARAMS = ("map_frame", "odom_frame", "base_frame", "camera_frame")
_PNP_FIELDS = {"pnp.threshold_px": "threshold_px", "pnp.refined_threshold_px": "refined_threshold_px",
               "pnp.reference_height_px": "reference_height_px",
               "pnp.min_inliers": "min_inliers", "pnp.top_k": "top_k",
               "pnp.max_uncertainty": "max_uncertainty", "pnp.max_iterations": "max_iterations",
               "pnp.refine_pixels": "refine_pixels", "pnp.refine_window_px": "refine_window_px",
               "pnp.refine_bf16": "refine_bf16",
               "pnp.photometric_refinement": "photometric_refinement", "pnp.solve_in_visit": "solve_in_visit",
               "pnp.seed_ray_depth_sigma": "seed_ray_depth_sigma",
               "pnp.resolve_min_support": "resolve_min_support", "pnp.map_floor": "map_floor"}


def descriptor(spec: Spec) -> ParameterDescriptor:
    """The ROS descriptor of a parameter: description, constraints, range, read-only."""
    constraints = [f"takes effect: {spec.applies}"]
    if spec.choices:
        constraints.append("one of: " + ", ".join(spec.choices) + (" or cuda:N" if spec.name == "device" else ""))
    d = ParameterDescriptor(description=spec.description, read_only=spec.read_only,
                            additional_constraints="; ".join(constraints))
    if spec.range is not None and isinstance(spec.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                     to_value=float(spec.range[1]), step=0.0)]
    elif spec.range is not None and isinstance(spec.default, int) and not isinstance(spec.default, bool):
        d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    return d


def declare_all(node) -> None:
    """Declare every parameter on ``node`` (overrides from YAML / launch are checked by the on-set callback)."""
    node.declare_parameters("", [(s.name, s.default, descriptor(s)) for s in PARAMETERS])


def check_value(name: str, value: Any, current: dict[str, Any] | None = None) -> str | None:
    """Why ``value`` is not allowed for ``name`` (None when it is). ``current``: the other values, for cross-checks."""
    spec = SPECS.get(name)
    if spec is None:
        return None  # not ours (use_sim_time, qos overrides, ...)
    if isinstance(spec.default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(spec.default):
        return f"{name} must be a {type(spec.default).__name__}, got {value!r}"
    if spec.choices and value not in spec.choices:
        if not (name == "device" and re.fullmatch(r"cuda:\d+", value)):
            extra = " or cuda:N" if name == "device" else ""
            return f"{name} must be one of {', '.join(spec.choices)}{extra}; got {value!r}"
    if spec.range is not None:
        lo, hi = spec.range
        if not (value == value and lo <= value <= hi):  # value == value: NaN is refused
            return f"{name} must be in [{lo:g}, {hi:g}]; got {value!r} ({spec.description})"
    if name in _FRAME_PARAMS and not _FRAME_RE.match(value):
        return (f"{name} must be a TF frame id (letters, digits, _ . / -, no leading '/'); got {value!r}")
    if name.startswith("mapping.") and name.endswith("_topic") and value and not _TOPIC_RE.match(value):
        return f"{name} must be a ROS topic name; got {value!r}"
    if name.startswith("pnp."):
        try:
            pnp_config({**(current or {}), name: value})
        except ValueError as e:
            return f"{name}={value!r} rejected: {e}"
    if name in _FRAME_PARAMS and current:
        for other in _FRAME_PARAMS:
            if other != name and current.get(other) == value:
                return f"{name} must differ from {other} (both {value!r})"
    return None


def check_parameters(parameters: Iterable, current: dict[str, Any]) -> SetParametersResult:
    """On-set callback body: refuse the whole set with the first reason found."""
    proposed = dict(current)
    params = list(parameters)
    for p in params:
        proposed[p.name] = p.value
    for p in params:
        reason = check_value(p.name, p.value, proposed)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
    return SetParametersResult(successful=True)


def pnp_config(values: dict[str, Any]) -> PnPConfig:
    """The ``PnPConfig`` for the ``pnp.*`` values (missing ones take their defaults); ValueError if invalid."""
    v = {k: values.get(k, SPECS[k].default) for k in _PNP_FIELDS}
    return PnPConfig(
        threshold_px=float(v["pnp.threshold_px"]),
        refined_threshold_px=float(v["pnp.refined_threshold_px"]),
        reference_height_px=float(v["pnp.reference_height_px"]) or None,
        min_inliers=int(v["pnp.min_inliers"]),
        top_k=int(v["pnp.top_k"]) or None,
        max_uncertainty=float(v["pnp.max_uncertainty"]) or None,
        max_iterations=int(v["pnp.max_iterations"]),
        min_iterations=min(PnPConfig.min_iterations, int(v["pnp.max_iterations"])),
        refine_pixels=bool(v["pnp.refine_pixels"]),
        refine_window_px=int(v["pnp.refine_window_px"]),
        refine_bf16=bool(v["pnp.refine_bf16"]),
        photometric_refinement=bool(v["pnp.photometric_refinement"]),
        solve_in_visit=bool(v["pnp.solve_in_visit"]),
        seed_ray_depth_sigma=float(v["pnp.seed_ray_depth_sigma"]),
        resolve_min_support=float(v["pnp.resolve_min_support"]),
        map_floor=bool(v["pnp.map_floor"]),
    )
