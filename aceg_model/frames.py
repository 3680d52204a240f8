"""The posed-image record every loader, bag reader and generator produces.

Conventions (used everywhere in the project):
- Images: ``uint8``, ``HxWx3`` RGB, or ``HxW`` for single-channel cameras.
- Intrinsics: pinhole, in pixels, origin at the centre of the top-left pixel
  (OpenCV), no distortion (loaders undistort or refuse).
- Camera frame: OpenCV optical frame (x right, y down, z forward; REP 103's
  ``*_optical_frame``).
- Poses are named by their frames: ``T_world_cam`` maps points from the
  camera frame to the scene ("world", ROS ``map``) frame, i.e. it is the
  camera-to-world transform, a 4x4 float64 matrix in metres.
- Depth: ``HxW`` float32 metres along the optical axis, 0 where invalid,
  registered to the image's intrinsics.
- Stamps: float seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels for an image of ``width`` x ``height``."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        values = (self.fx, self.fy, self.cx, self.cy)
        if not all(np.isfinite(v) for v in values):
            raise ValueError(f"intrinsics must be finite, got {self}")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"focal lengths must be > 0 px, got fx={self.fx}, fy={self.fy}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be > 0 px, got {self.width}x{self.height}")

    @property
    def K(self) -> np.ndarray:  # noqa: N802 - K is the standard name
        """The 3x3 camera matrix."""
        return np.array(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=np.float64
        )

    @classmethod
    def from_K(cls, K: np.ndarray, width: int, height: int) -> "Intrinsics":  # noqa: N802
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3):
            raise ValueError(f"K must be 3x3, got shape {K.shape}")
        return cls(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), int(width), int(height))

    @classmethod
    def centred(cls, focal: float, width: int, height: int) -> "Intrinsics":
        """Square pixels and the principal point at the image centre (7-Scenes convention)."""
        return cls(focal, focal, width / 2.0, height / 2.0, width, height)

    def resized(self, width: int, height: int) -> "Intrinsics":
        """Intrinsics of the image resized to ``width`` x ``height`` (pixel centres stay integers)."""
        sx, sy = width / self.width, height / self.height
        # x' + 0.5 = (x + 0.5) * s: the resize maps pixel edges, not pixel centres, onto each other.
        return Intrinsics(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
                          width, height)


@dataclass
class Frame:
    """One posed image. See the module docstring for units and conventions."""

    image: np.ndarray
    intrinsics: Intrinsics
    T_world_cam: np.ndarray
    stamp: float = 0.0
    depth: np.ndarray | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim not in (2, 3):
            raise ValueError(
                f"frame {self.name!r}: image must be uint8 HxW or HxWx3, "
                f"got {self.image.dtype} with shape {self.image.shape}"
            )
        if self.image.ndim == 3 and self.image.shape[2] != 3:
            raise ValueError(f"frame {self.name!r}: colour images must have 3 channels, got {self.image.shape}")
        h, w = self.image.shape[:2]
        if (w, h) != (self.intrinsics.width, self.intrinsics.height):
            raise ValueError(
                f"frame {self.name!r}: image is {w}x{h} px but intrinsics are for "
                f"{self.intrinsics.width}x{self.intrinsics.height} px"
            )
        self.T_world_cam = check_pose(self.T_world_cam, what=f"frame {self.name!r} pose")
        if self.depth is not None and self.depth.shape != (h, w):
            raise ValueError(f"frame {self.name!r}: depth shape {self.depth.shape} != image {(h, w)}")

    @property
    def rgb(self) -> np.ndarray:
        """The image as HxWx3 RGB (grey images are replicated)."""
        if self.image.ndim == 2:
            return np.repeat(self.image[:, :, None], 3, axis=2)
        return self.image

    def with_image(self, image: np.ndarray) -> "Frame":
        return replace(self, image=image)


def check_pose(T: np.ndarray, what: str = "pose", tol: float = 1e-3) -> np.ndarray:
    """Return ``T`` as a float64 4x4 rigid transform or raise ``ValueError`` saying why not.

    ``tol`` bounds ``|R^T R - I|`` and ``|det R - 1|``; real datasets store
    rotations to about 4 decimals (7-Scenes: within 4e-4). Within it, the rotation
    is replaced by the nearest true one: 7-Scenes' matrices are off by ~1e-4,
    which is harmless in a projection but reads as a 0.7-1.3 degree turn in a
    trace-based rotation error.
    """
    T = np.asarray(T, dtype=np.float64)
    if T.shape == (3, 4):
        T = np.vstack([T, [0.0, 0.0, 0.0, 1.0]])
    if T.shape != (4, 4):
        raise ValueError(f"{what}: expected a 4x4 (or 3x4) matrix, got shape {T.shape}")
    if not np.all(np.isfinite(T)):
        raise ValueError(f"{what}: contains NaN or inf")
    if not np.allclose(T[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise ValueError(f"{what}: last row must be [0 0 0 1], got {T[3]}")
    R = T[:3, :3]
    err = max(np.abs(R.T @ R - np.eye(3)).max(), abs(np.linalg.det(R) - 1.0))
    if err > tol:
        raise ValueError(f"{what}: rotation is not orthonormal (error {err:.2g} > {tol})")
    if err > 1e-12:  # a true rotation already is kept bit for bit
        u, _, vt = np.linalg.svd(R)
        T = T.copy()
        T[:3, :3] = u @ vt  # the nearest rotation (det +1: R is within tol of one)
    return T
