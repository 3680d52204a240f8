"""Robot-like camera trajectories: smooth paths through free space, handheld or wheeled.

A path is a cubic spline through random waypoints that keep a clearance from
walls and objects (a closed loop in a room, a walk down a street). Poses are
sampled at equal arc-length steps; heading, pitch, roll and height vary with
smooth noise whose wavelength is in metres along the path, so motion stays
smooth at any frame rate. World z is up; cameras use the OpenCV optical frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter1d

from aceg_model.geometry import make_pose
from aceg_model.scene.layout import Layout


@dataclass(frozen=True)
class TrajectoryParams:
    """How a camera moves. ``None`` picks a value suited to the layout and style."""

    style: str = "handheld"  # "handheld" (walking person) or "wheeled" (ground robot, no roll)
    step_m: float | None = None  # path length per frame; None: 0.08 m in rooms, 0.5 m on streets
    cover_path: bool = False  # spread the frames over the whole path (a mapping scan); overrides step_m
    height_m: float | None = None  # mean camera height; None: random per style
    height_offset_m: float = 0.0  # added to the height (query viewpoint change)
    yaw_offset_deg: float = 0.0  # added to the heading (query viewpoint change)
    lateral_offset_m: float = 0.0  # sideways shift from the path, where the clearance allows
    yaw_noise_deg: float | None = None  # smooth heading wobble amplitude; None: by style
    reverse: bool = False  # travel the path the other way

    def __post_init__(self) -> None:
        if self.style not in ("handheld", "wheeled"):
            raise ValueError(f"trajectory style must be 'handheld' or 'wheeled', got {self.style!r}")


@dataclass
class Path:
    """An xy spline by arc length ``s`` in metres."""

    spline: CubicSpline
    length_m: float
    closed: bool

    def xy(self, s: np.ndarray) -> np.ndarray:
        return self.spline(np.mod(s, self.length_m) if self.closed else np.clip(s, 0, self.length_m))

    def tangent(self, s: np.ndarray) -> np.ndarray:
        d = self.spline(np.mod(s, self.length_m) if self.closed else np.clip(s, 0, self.length_m), 1)
        return d / np.linalg.norm(d, axis=1, keepdims=True)


def camera_pose(position: np.ndarray, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """T_world_cam of an optical-frame camera looking along heading ``yaw`` (radians from +x,
    counter-clockwise), tilted up by ``pitch`` and rolled clockwise by ``roll``, in a z-up world."""
    forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(forward, right)
    c, s = np.cos(roll), np.sin(roll)
    x_cam, y_cam = c * right + s * down, -s * right + c * down
    return make_pose(np.stack([x_cam, y_cam, forward], axis=1), position)


def smooth_noise(rng: np.random.Generator, s: np.ndarray, wavelength_m: float, amplitude: float) -> np.ndarray:
    """A smooth random function of arc length: cubic through N(0, amplitude) knots every ``wavelength_m``."""
    lo, hi = float(np.min(s)), float(np.max(s))
    knots = np.arange(lo - 2 * wavelength_m, hi + 3 * wavelength_m, wavelength_m)
    return CubicSpline(knots, rng.normal(0.0, amplitude, len(knots)))(s)


def smooth_heading(path: Path, s: np.ndarray, sigma_m: float) -> np.ndarray:
    """Heading (radians) of the path tangent, low-passed over ``sigma_m`` of arc length, so that
    the camera turns gently through bends."""
    res = 0.02
    dense = np.arange(np.min(s) - 3 * sigma_m, np.max(s) + 3 * sigma_m + res, res)
    tangent = path.tangent(dense)
    yaw = gaussian_filter1d(np.unwrap(np.arctan2(tangent[:, 1], tangent[:, 0])), sigma_m / res, mode="nearest")
    return np.interp(s, dense, yaw)


def plan_path(layout: Layout, rng: np.random.Generator, clearance_m: float | None = None) -> Path:
    """A smooth path through the layout's free space, keeping ``clearance_m`` from obstacles."""
    closed = layout.kind == "room"
    clearance = clearance_m if clearance_m is not None else (0.6 if closed else 1.2)
    x0, y0, x1, y1 = layout.walk_region
    for attempt in range(200):
        c = clearance * (0.97 ** (attempt // 10))  # relax slowly if the room is crowded
        cand = np.stack([rng.uniform(x0, x1, 400), rng.uniform(y0, y1, 400)], 1)
        cand = cand[layout.clearance(cand) >= c]
        k = int(rng.integers(4, 8))
        if len(cand) < k:
            continue
        pts = cand[rng.choice(len(cand), k, replace=False)]
        if closed:
            rel = pts - layout.centre_xy
            pts = pts[np.argsort(np.arctan2(rel[:, 1], rel[:, 0]))]  # counter-clockwise loop
            pts = np.vstack([pts, pts[:1]])
        else:
            pts = pts[np.argsort(pts[:, 0])]
        chord = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
        if np.any(np.diff(chord) < (1.0 if closed else 4.0)):  # close waypoints make sharp turns
            continue
        spline = CubicSpline(chord, pts, bc_type="periodic" if closed else "natural")
        # Re-parametrize by arc length so that equal steps in s are equal distances.
        dense_t = np.linspace(0.0, chord[-1], 2000)
        seg = np.linalg.norm(np.diff(spline(dense_t), axis=0), axis=1)
        arc = np.r_[0.0, np.cumsum(seg)]
        s_knots = np.linspace(0.0, arc[-1], 400)
        xy = spline(np.interp(s_knots, arc, dense_t))
        if closed:
            xy[-1] = xy[0]
        if layout.clearance(xy).min() < 0.8 * c:
            continue
        return Path(CubicSpline(s_knots, xy, bc_type="periodic" if closed else "natural"), float(arc[-1]), closed)
    raise RuntimeError(f"no collision-free path found in this {layout.kind} (clearance {clearance} m)")


def sample_trajectory(layout: Layout, path: Path, rng: np.random.Generator, n_frames: int,
                      params: TrajectoryParams = TrajectoryParams()) -> np.ndarray:
    """``n_frames`` x 4 x 4 camera-to-world poses along ``path``."""
    room = layout.kind == "room"
    handheld = params.style == "handheld"
    if params.cover_path:
        # Once round a loop, or from end to end of an open path (with a margin for the wobble).
        step = float(np.clip(path.length_m / max(n_frames - (0 if path.closed else 1), 1), 0.02, 2.0))
        step *= 1.0 if path.closed else 0.95
    else:
        step = params.step_m or (0.08 if room else 0.5)
    if not path.closed:
        step = min(step, 0.95 * path.length_m / max(n_frames - 1, 1))
    span = step * (n_frames - 1)
    start = rng.uniform(0, path.length_m) if path.closed else rng.uniform(0, path.length_m - span)
    s = start + step * np.arange(n_frames)
    if params.reverse:
        s = s[::-1]
    xy = path.xy(s)
    tangent = path.tangent(s) * (-1.0 if params.reverse else 1.0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1)  # left of travel

    # Sideways offset, shrunk where it would bring the camera too close to something.
    lateral_N = params.lateral_offset_m + (smooth_noise(rng, s, 2.0, 0.05) if handheld else np.zeros(n_frames))
    for scale in (1.0, 0.5, 0.0):
        moved = xy + normal * (scale * lateral_N)[:, None]
        if layout.clearance(moved).min() >= 0.3:
            xy = moved
            break

    # Heading: along the path; handheld cameras in rooms also turn towards the walls
    # (the loop is counter-clockwise, so "outward" is to the right of travel).
    yaw = smooth_heading(path, s, 1.0 if room else 3.0) + (np.pi if params.reverse else 0.0)
    yaw += np.radians(params.yaw_offset_deg)
    if handheld and room:
        yaw -= rng.uniform(0.0, 0.7) * np.pi / 2 * (-1.0 if params.reverse else 1.0)
    yaw_noise = params.yaw_noise_deg if params.yaw_noise_deg is not None else (20.0 if handheld else 3.0)
    yaw = yaw + smooth_noise(rng, s, 3.0 if room else 8.0, np.radians(yaw_noise))

    if handheld:
        height = params.height_m or (rng.uniform(1.1, 1.7) if room else rng.uniform(1.4, 1.8))
        z = height + smooth_noise(rng, s, 1.5, 0.08)
        pitch = np.radians(-8.0 if room else 4.0) + smooth_noise(rng, s, 2.0, np.radians(8.0))
        roll = smooth_noise(rng, s, 2.0, np.radians(3.0))
    else:
        height = params.height_m or rng.uniform(0.25, 0.6)
        z = np.full(n_frames, height) + smooth_noise(rng, s, 0.5, 0.004)  # floor bumps
        pitch = np.full(n_frames, np.radians(rng.uniform(-3.0, 10.0)))
        roll = smooth_noise(rng, s, 0.5, np.radians(0.3))
    z = np.clip(z + params.height_offset_m, *layout.camera_z_range)
    return np.stack([camera_pose(np.array([*p, h]), a, b, c) for p, h, a, b, c in zip(xy, z, yaw, pitch, roll)])
