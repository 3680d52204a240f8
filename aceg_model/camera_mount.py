"""Where the camera sits in the frame its poses describe.

Mapping takes each image's pose as the camera's pose. On a robot the pose usually comes from
elsewhere (odometry of the base, a motion-capture body, a tracked depth camera) and reaches the
camera through a mounting transform that may be off by a degree or two and a few centimetres.
Such a fixed error bends every pair of views the same way: their matches miss the poses'
epipolar lines, landmarks land off their rays, and a query's pose carries the error. On a
generated room with the camera turned (0.5, 0.75, -0.3) degrees and shifted 2.5 cm from its pose
frame, 88 % of relit queries were within 5 cm / 5 deg instead of 100 % (median 2.2 cm against
0.2 cm).

``aceg_model.lens`` estimates the mount from the posed mapping images, together with the lens;
mapping then works with the camera's poses (``pose @ T_pose_camera``), and localization returns
the pose of the frame the mapping poses described again (``CameraMount.to_pose_frame``), so
that results compare with the user's own poses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from aceg_model.geometry import invert, make_pose, skew

# A mount estimate beyond these is a failed fit (or a tampered map), not a mounting error.
MAX_MOUNT_DEG = 10.0
MAX_MOUNT_M = 0.2


@dataclass(frozen=True)
class CameraMount:
    """The camera's pose in its pose frame: ``T_world_camera = T_world_pose @ T_pose_camera``.

    ``rotation_deg`` is a rotation vector in degrees, ``translation_m`` the camera's centre in
    the pose frame, in metres. The default is the identity (the poses are the camera's)."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_m: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        r, t = np.asarray(self.rotation_deg, dtype=float), np.asarray(self.translation_m, dtype=float)
        if r.shape != (3,) or t.shape != (3,) or not (np.isfinite(r).all() and np.isfinite(t).all()):
            raise ValueError(f"camera mount needs 3 finite rotation and 3 finite translation values, "
                             f"got {self.rotation_deg}, {self.translation_m}")
        object.__setattr__(self, "rotation_deg", tuple(float(v) for v in r))
        object.__setattr__(self, "translation_m", tuple(float(v) for v in t))

    @classmethod
    def from_vector(cls, x6: np.ndarray) -> "CameraMount":
        """From (rotation vector in degrees, translation in metres)."""
        return cls(tuple(x6[:3]), tuple(x6[3:6]))

    @property
    def angle_deg(self) -> float:
        return float(np.linalg.norm(self.rotation_deg))

    @property
    def offset_m(self) -> float:
        return float(np.linalg.norm(self.translation_m))

    @property
    def within_limits(self) -> bool:
        """Whether a mounting error could be this large (``MAX_MOUNT_DEG``, ``MAX_MOUNT_M``)."""
        return self.angle_deg <= MAX_MOUNT_DEG and self.offset_m <= MAX_MOUNT_M

    @property
    def is_identity(self) -> bool:
        return self.angle_deg == 0.0 and self.offset_m == 0.0

    @property
    def T_pose_camera(self) -> np.ndarray:  # noqa: N802 - frame names as in the rest of the code
        R = Rotation.from_rotvec(np.radians(self.rotation_deg)).as_matrix()
        return make_pose(R, np.asarray(self.translation_m))

    def camera_pose(self, T_world_pose: np.ndarray) -> np.ndarray:
        """The camera's pose from a pose of the frame it is mounted on."""
        return T_world_pose if self.is_identity else T_world_pose @ self.T_pose_camera

    def to_pose_frame(self, T_world_cam: np.ndarray, covariance_66: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """A camera pose and its covariance (``pnp.pose_covariance``'s convention: centre along the
        world axes, then a rotation about the fixed world axes) as the pose of the frame the camera
        is mounted on. A rotation error ``dtheta`` of the camera swings the pose frame's origin,
        ``a`` away from the camera centre, by ``dtheta x a``: that is the only coupling."""
        T_world_pose = T_world_cam if self.is_identity else T_world_cam @ invert(self.T_pose_camera)
        if covariance_66 is None or self.offset_m == 0.0:
            return T_world_pose, covariance_66
        lever_3 = T_world_pose[:3, 3] - T_world_cam[:3, 3]
        A = np.eye(6)
        A[:3, 3:] = -skew(lever_3)
        return T_world_pose, A @ covariance_66 @ A.T

    def to_meta(self) -> dict:
        return {"rotation_deg": list(self.rotation_deg), "translation_m": list(self.translation_m)}

    @classmethod
    def from_meta(cls, meta: dict) -> "CameraMount":
        """From ``to_meta``'s dict; refuses values no mounting error has."""
        mount = cls(tuple(meta["rotation_deg"]), tuple(meta["translation_m"]))
        if not mount.within_limits:
            raise ValueError(f"camera mount of {mount.angle_deg:.2f} deg and {100 * mount.offset_m:.1f} cm is out "
                             f"of range (<= {MAX_MOUNT_DEG:g} deg, <= {100 * MAX_MOUNT_M:g} cm)")
        return mount
