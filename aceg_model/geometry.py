"""Rigid-transform helpers shared by loaders, bag I/O, metrics and the localizer.

Quaternions are ``[x, y, z, w]`` (ROS order). Poses are 4x4 float64 matrices
named by their frames (``T_a_b`` maps points from frame b to frame a).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation, Slerp


def make_pose(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 transform from a 3x3 rotation and a translation."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def pose_from_quat(t_xyz: np.ndarray, q_xyzw: np.ndarray) -> np.ndarray:
    """4x4 transform from a translation and an ``[x, y, z, w]`` quaternion (normalized here)."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-9:
        raise ValueError(f"quaternion must be finite and non-zero, got {q}")
    return make_pose(Rotation.from_quat(q / n).as_matrix(), t_xyz)


def quat_from_pose(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(translation, ``[x, y, z, w]`` quaternion with w >= 0) of a 4x4 transform."""
    q = Rotation.from_matrix(T[:3, :3]).as_quat()
    if q[3] < 0:
        q = -q
    return T[:3, 3].copy(), q


def pose7(T: np.ndarray | None) -> list[float] | None:
    """``[x, y, z, qx, qy, qz, qw]`` of a 4x4 transform, as plain floats for JSON (None stays None)."""
    if T is None:
        return None
    t, q = quat_from_pose(np.asarray(T, dtype=np.float64))
    return [float(v) for v in (*t, *q)]


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform."""
    Ti = np.eye(4)
    Ti[:3, :3] = T[:3, :3].T
    Ti[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return Ti


def interpolate_poses(
    stamps: np.ndarray, poses: np.ndarray, query: np.ndarray, max_gap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate poses (N x 4 x 4 at sorted ``stamps``) to ``query`` stamps.

    Translation is linear, rotation is slerp between the two bracketing poses.
    A query is valid when it lies within ``max_gap`` seconds of a pose sample
    (inside the range: both neighbours within ``max_gap``; outside: the nearest
    end within ``max_gap``, held constant). Returns (Q x 4 x 4 poses,
    Q bool valid); invalid rows are NaN.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    out = np.full((len(query), 4, 4), np.nan)
    valid = np.zeros(len(query), dtype=bool)
    if len(stamps) == 0:
        return out, valid
    if np.any(np.diff(stamps) < 0):
        raise ValueError("pose stamps must be sorted in time")
    rotations = Rotation.from_matrix(poses[:, :3, :3])
    for i, s in enumerate(query):
        j = int(np.searchsorted(stamps, s))
        if j < len(stamps) and stamps[j] == s:
            out[i], valid[i] = poses[j], True
            continue
        if j == 0 or j == len(stamps):
            k = 0 if j == 0 else len(stamps) - 1
            if abs(stamps[k] - s) <= max_gap:
                out[i], valid[i] = poses[k], True
            continue
        t0, t1 = stamps[j - 1], stamps[j]
        if s - t0 > max_gap or t1 - s > max_gap:
            continue
        a = (s - t0) / (t1 - t0)
        R = Slerp([0.0, 1.0], rotations[[j - 1, j]])([a]).as_matrix()[0]
        t = (1 - a) * poses[j - 1, :3, 3] + a * poses[j, :3, 3]
        out[i], valid[i] = make_pose(R, t), True
    return out, valid


def skew(v: np.ndarray) -> np.ndarray:
    """The cross-product matrix ``[v]x`` of each 3-vector (shape ``(..., 3)`` -> ``(..., 3, 3)``):
    ``[v]x @ w == np.cross(v, w)``."""
    v = np.asarray(v, dtype=np.float64)
    S = np.zeros(v.shape + (3,))
    S[..., 0, 1], S[..., 0, 2] = -v[..., 2], v[..., 1]
    S[..., 1, 0], S[..., 1, 2] = v[..., 2], -v[..., 0]
    S[..., 2, 0], S[..., 2, 1] = -v[..., 1], v[..., 0]
    return S


def pose_error(T_est: np.ndarray, T_gt: np.ndarray) -> tuple[float, float]:
    """(translation error in metres, rotation error in degrees) between two camera poses."""
    dt = float(np.linalg.norm(T_est[:3, 3] - T_gt[:3, 3]))
    # Not arccos of the trace alone: near zero it turns a matrix's 1e-4 departure from a rotation
    # into a degree. atan2 of the antisymmetric part (sin) against the trace (cos) reads small
    # angles exactly, is blind to a symmetric departure, and costs a tenth of scipy's
    # Rotation.from_matrix (pair selection calls this tens of thousands of times per map).
    R = T_est[:3, :3].T @ T_gt[:3, :3]
    sin = 0.5 * float(np.linalg.norm([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]))
    return dt, float(np.degrees(np.arctan2(sin, (np.trace(R) - 1.0) / 2.0)))
