"""Radial lens distortion and the camera's mount: estimated from the posed mapping images.

Mapping treats images as pinhole. A lens that bends rays (barrel or pincushion) moves a point
seen near the image border by several pixels: with k1 = -0.09 at f = 525 px, 10 px at 330 px from
the centre. Landmarks seeded there sit off their true rays, and a query that sees them nearer its
centre (the camera turned) meets them where the bend is different, so its pose is pulled aside.
Mapping images with known poses can measure the bend: matched points of two views must lie on
each other's epipolar lines, and only the right distortion puts them there at the border as
well as at the centre. This module fits OpenCV's radial model (``k1``, ``k2`` of plumb_bob) to
that, keeps it only if it also helps pairs it was not fitted on, and removes it from mapping
and query images alike (same camera matrix K, so nothing downstream changes).

A calibrated camera (ROS ``camera_info`` with its distortion) is undistorted before it gets
here; the estimate is then of what the calibration left, usually nothing.

The same matches also measure a fixed turn and offset between the camera and the frame its
poses describe (``aceg_model.camera_mount``), fitted jointly with the lens. A mount is a
constant, so it is kept only if it helps the held-out pairs and the two halves of the pairs,
fitted apart, agree on it: poses that are off in ways that change along the sequence (tracking
drift) give no mount.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import cv2
import numpy as np
import torch
from scipy.optimize import least_squares

from aceg_model.camera_mount import MAX_MOUNT_DEG, MAX_MOUNT_M, CameraMount
from aceg_model.frames import Frame, Intrinsics
from aceg_model.geometry import skew


@dataclass(frozen=True)
class RadialDistortion:
    """OpenCV's radial distortion ``x_d = x_u (1 + k1 r^2 + k2 r^4)`` in normalized coordinates."""

    k1: float = 0.0
    k2: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.k1) and np.isfinite(self.k2)):
            raise ValueError(f"distortion coefficients must be finite, got k1={self.k1}, k2={self.k2}")

    @property
    def coefficients(self) -> np.ndarray:
        """The 5 plumb_bob coefficients (k1, k2, p1, p2, k3) OpenCV takes."""
        return np.array([self.k1, self.k2, 0.0, 0.0, 0.0])

    @property
    def is_zero(self) -> bool:
        return self.k1 == 0.0 and self.k2 == 0.0


class ImageUndistorter:
    """Removes a lens distortion from images of one camera; the output keeps the camera's K.

    The one undistortion of images at their own K: the localizer and mapping remove the map's
    estimated radial lens with it (``RadialDistortion.coefficients``), the ROS node and replay a
    ``camera_info``'s calibration (``aceg_ros.ros_conversions.camera_model_from_info``).
    ``coefficients`` are OpenCV's (plumb_bob / rational_polynomial order), or with ``fisheye``
    its fisheye model's four (ROS's equidistant). The remap tables are built once per
    (intrinsics, distortion) and reused. Pixels that come from beyond the image edge repeat the
    edge rather than turning black, so the encoder sees no artificial border.
    """

    def __init__(self) -> None:
        self._key = None
        self._maps = None

    def __call__(self, image: np.ndarray, intrinsics: Intrinsics, coefficients: Sequence[float],
                 fisheye: bool = False) -> np.ndarray:
        D = np.asarray(coefficients, dtype=np.float64)
        if not D.any():
            return image
        key = (intrinsics, D.tobytes(), fisheye)
        if key != self._key:
            K, size = intrinsics.K, (intrinsics.width, intrinsics.height)
            if fisheye:
                if len(D) < 4:
                    raise ValueError(f"fisheye (equidistant) distortion needs 4 coefficients, got {len(D)}")
                self._maps = cv2.fisheye.initUndistortRectifyMap(K, D[:4], np.eye(3), K, size, cv2.CV_32FC1)
            else:
                self._maps = cv2.initUndistortRectifyMap(K, D, None, K, size, cv2.CV_32FC1)
            self._key = key
        return cv2.remap(image, self._maps[0], self._maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class CorrectedFrames(Sequence[Frame]):
    """A view of ``frames`` whose images have ``distortion`` removed and whose poses are the
    camera's through ``mount`` (loaded lazily, like the frames)."""

    def __init__(self, frames: Sequence[Frame], distortion: RadialDistortion,
                 mount: CameraMount | None = None) -> None:
        self._frames = frames
        self._distortion = distortion
        self._mount = mount or CameraMount()
        self._undistort = ImageUndistorter()

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, i: int) -> Frame:  # type: ignore[override]
        frame = self._frames[i]
        return replace(frame, image=self._undistort(frame.image, frame.intrinsics, self._distortion.coefficients),
                       T_world_cam=self._mount.camera_pose(frame.T_world_cam))

    def pose(self, i: int) -> np.ndarray:
        return self._mount.camera_pose(frame_pose(self._frames, i))


def frame_pose(frames: Sequence[Frame], i: int) -> np.ndarray:
    """Frame ``i``'s camera-to-world pose, without loading its image where the dataset can."""
    pose = getattr(frames, "pose", None)
    return pose(i) if callable(pose) else frames[i].T_world_cam


@dataclass(frozen=True)
class LensConfig:
    """How mapping estimates the lens distortion and the camera mount (``estimate_lens``)."""

    estimate: bool = True
    # The camera's turn and offset from its pose frame (``aceg_model.camera_mount``); only with ``estimate``.
    estimate_mount: bool = True
    max_pairs: int = 60  # image pairs matched; ~0.1 s each on the 2-core CPU at 640x480
    max_frames: int = 600  # longer sequences are subsampled evenly before pairing (the pair search is quadratic)
    # A pair must have parallax (a baseline) for its epipolar lines to exist, and some rotation,
    # so that points move across the image radius between its two views.
    min_baseline_m: float = 0.05
    min_angle_deg: float = 5.0
    max_angle_deg: float = 45.0
    max_features: int = 2000  # SIFT keypoints per image
    ratio: float = 0.8  # Lowe's ratio test
    min_matches: int = 500  # fewer matches over all pairs: no estimate
    max_epipolar_px: float = 20.0  # matches farther than this from their line (pinhole) are mismatches
    robust_px: float = 1.5  # scale of the Cauchy loss on the epipolar distances
    # The fit is kept only if it lowers the robust cost of the pairs it was not fitted on by this
    # fraction; a pinhole camera's estimate then stays exactly zero.
    min_gain: float = 0.03
    max_abs_coefficient: float = 0.5  # |k1|, |k2| beyond this are not a lens but a failed fit
    # The two halves of the pairs, fitted apart, must find the same mount within these. On
    # generated room 900003 (a 1 deg, 2.5 cm mount) they agreed to 0.03 deg and 0.03 cm; on the
    # 7-Scenes kitchen's tracked poses, whose errors change along the sequence, they differ by
    # 1.7 deg and 14 cm.
    mount_agreement_deg: float = 0.2
    mount_agreement_m: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_pairs < 2 or self.max_frames < 2:
            raise ValueError(f"max_pairs and max_frames must be >= 2 (half fit, half check), got "
                             f"{self.max_pairs}, {self.max_frames}")
        if not 0 <= self.min_angle_deg < self.max_angle_deg <= 180:
            raise ValueError(f"need 0 <= min_angle_deg < max_angle_deg <= 180, got "
                             f"{self.min_angle_deg}, {self.max_angle_deg}")
        if self.min_baseline_m <= 0 or self.robust_px <= 0 or self.max_epipolar_px <= 0:
            raise ValueError("min_baseline_m, robust_px and max_epipolar_px must be > 0")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.mount_agreement_deg <= 0 or self.mount_agreement_m <= 0:
            raise ValueError(f"mount_agreement_deg and mount_agreement_m must be > 0, got "
                             f"{self.mount_agreement_deg}, {self.mount_agreement_m}")


@dataclass
class LensEstimate:
    """What ``estimate_lens`` found; ``distortion`` is zero unless ``accepted``, ``mount`` the
    identity unless ``mount_accepted``."""

    distortion: RadialDistortion
    accepted: bool
    reason: str
    mount: CameraMount = field(default_factory=CameraMount)
    mount_accepted: bool = False
    mount_reason: str = "not estimated"
    n_pairs: int = 0
    n_matches: int = 0
    median_px_before: float | None = None  # epipolar distance of the matches, pinhole
    median_px_after: float | None = None  # with the fitted distortion
    held_out_gain: float | None = None  # relative drop of the robust cost on the pairs not fitted
    seconds: float = 0.0


@dataclass
class PairMatches:
    xa_N2: np.ndarray  # pixels in image a
    xb_N2: np.ndarray
    E_33: np.ndarray  # essential matrix from the poses: x_a^T E x_b = 0 (normalized coordinates)
    intrinsics_a: Intrinsics
    intrinsics_b: Intrinsics
    frames_ab: tuple[int, int] = (-1, -1)  # which images, as indices of the frames matched
    names_ab: tuple[str, str] = ("", "")  # and as the frames name them


def select_pairs(poses_I44: np.ndarray, config: LensConfig) -> list[tuple[int, int]]:
    """Up to ``max_pairs`` image pairs with a baseline and a rotation in range, each image in at
    most two pairs (so the pairs spread over the sequence), in a seeded random order. Indices
    are of ``poses_I44``; at most ``max_frames`` evenly spaced ones are considered."""
    keep = np.unique(np.linspace(0, len(poses_I44) - 1, min(len(poses_I44), config.max_frames)).round().astype(int))
    centres = poses_I44[keep, :3, 3]
    R = poses_I44[keep, :3, :3]
    cos = (np.einsum("aji,bji->ab", R, R) - 1.0) / 2.0  # trace(R_a^T R_b) = 1 + 2 cos(angle)
    angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    baseline = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    a, b = np.nonzero(np.triu((baseline >= config.min_baseline_m) & (angle >= config.min_angle_deg)
                              & (angle <= config.max_angle_deg), k=1))
    a, b = keep[a], keep[b]
    order = np.random.default_rng(config.seed).permutation(len(a))
    uses = np.zeros(len(poses_I44), dtype=int)
    pairs = []
    for k in order:
        i, j = int(a[k]), int(b[k])
        if uses[i] < 2 and uses[j] < 2:
            pairs.append((i, j))
            uses[i] += 1
            uses[j] += 1
            if len(pairs) == config.max_pairs:
                break
    return pairs


def _essential(T_world_a: np.ndarray, T_world_b: np.ndarray) -> np.ndarray:
    T_ab = np.linalg.inv(T_world_a) @ T_world_b  # X_a = R X_b + t
    return skew(T_ab[:3, 3]) @ T_ab[:3, :3]


def normalized(pixels_N2: np.ndarray, intrinsics: Intrinsics, distortion: RadialDistortion) -> np.ndarray:
    """Undistorted normalized coordinates of distorted pixels. The radial model is inverted by
    fixed-point iteration, which converges for the mild distortions a pinhole-used lens has."""
    xd = (pixels_N2 - [intrinsics.cx, intrinsics.cy]) / [intrinsics.fx, intrinsics.fy]
    xu = xd
    for _ in range(20):
        r2 = np.sum(xu * xu, axis=1, keepdims=True)
        xu = xd / (1.0 + distortion.k1 * r2 + distortion.k2 * r2 * r2)
    return xu


def epipolar_px(pair: PairMatches, distortion: RadialDistortion) -> np.ndarray:
    """Sampson distance of each match to the pair's epipolar geometry, in pixels of image a."""
    na = np.c_[normalized(pair.xa_N2, pair.intrinsics_a, distortion), np.ones(len(pair.xa_N2))]
    nb = np.c_[normalized(pair.xb_N2, pair.intrinsics_b, distortion), np.ones(len(pair.xb_N2))]
    Eb, Ea = nb @ pair.E_33.T, na @ pair.E_33
    num = np.sum(na * Eb, axis=1) ** 2
    den = Eb[:, 0] ** 2 + Eb[:, 1] ** 2 + Ea[:, 0] ** 2 + Ea[:, 1] ** 2
    f = 0.5 * (pair.intrinsics_a.fx + pair.intrinsics_a.fy)
    return f * np.sqrt(num / np.maximum(den, 1e-20))


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def ratio_matches(desc_a: np.ndarray, desc_b: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (in a, in b) of the descriptors of a whose nearest neighbour in b (L2) is closer than
    ``ratio`` times the second nearest: Lowe's ratio test, exhaustively. One matrix product per pair
    (OpenCV's brute-force matcher took twice as long on the kitchen's 1500-keypoint images, and
    made the same matches on 100 pairs)."""
    a, b = torch.from_numpy(desc_a).float(), torch.from_numpy(desc_b).float()
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * (a @ b.T)
    nearest, idx = d2.topk(2, dim=1, largest=False)
    dist = nearest.clamp(min=0.0).sqrt()
    good = (dist[:, 0] < ratio * dist[:, 1]).nonzero()[:, 0]
    return good.numpy(), idx[good, 0].numpy()


def match_pairs(frames: Sequence[Frame], pairs: list[tuple[int, int]], config: LensConfig) -> list[PairMatches]:
    sift = cv2.SIFT_create(config.max_features)
    features: dict[int, tuple[np.ndarray, np.ndarray | None, Frame]] = {}

    def features_of(i: int):
        if i not in features:
            frame = frames[i]
            keypoints, desc = sift.detectAndCompute(_grey(frame.image), None)
            features[i] = (np.array([k.pt for k in keypoints], dtype=np.float64).reshape(-1, 2), desc, frame)
        return features[i]

    out = []
    for i, j in pairs:
        (pa, da, fa), (pb, db, fb) = features_of(i), features_of(j)
        if da is None or db is None or len(da) < 2 or len(db) < 2:
            continue
        ia, ib = ratio_matches(da, db, config.ratio)
        if not len(ia):
            continue
        pair = PairMatches(pa[ia], pb[ib],
                            _essential(fa.T_world_cam, fb.T_world_cam), fa.intrinsics, fb.intrinsics, (i, j),
                            (fa.name, fb.name))
        keep = epipolar_px(pair, RadialDistortion()) < config.max_epipolar_px
        if keep.sum() >= 8:
            out.append(replace(pair, xa_N2=pair.xa_N2[keep], xb_N2=pair.xb_N2[keep]))
    return out


@dataclass(frozen=True)
class _Model:
    """A fitted camera model: the lens (``n_terms`` radial coefficients fitted) and the mount."""

    distortion: RadialDistortion
    mount: CameraMount
    n_terms: int


def _epipolar_all(pairs: list[PairMatches], model: _Model, poses_I44: np.ndarray) -> np.ndarray:
    """Every match's epipolar distance (px) under the model; with a mount, each pair's essential
    matrix is that of the cameras' poses instead of the given ones."""
    if model.mount.is_identity:
        return np.concatenate([epipolar_px(p, model.distortion) for p in pairs])
    D = model.mount.T_pose_camera
    return np.concatenate([epipolar_px(replace(p, E_33=_essential(poses_I44[p.frames_ab[0]] @ D,
                                                                  poses_I44[p.frames_ab[1]] @ D)), model.distortion)
                           for p in pairs])


def _robust_cost(pairs: list[PairMatches], model: _Model, poses_I44: np.ndarray, scale_px: float) -> float:
    d = _epipolar_all(pairs, model, poses_I44)
    return float(np.mean(np.log1p((d / scale_px) ** 2)))


def _model_of(x: np.ndarray, n_terms: int, n_mount: int) -> _Model:
    """Parameters: ``n_terms`` radial coefficients, then the mount's rotation vector in 0.01 rad
    and (``n_mount`` 6) its translation in cm, units in which all steps are of similar size."""
    mount = np.zeros(6)
    mount[:3] = np.degrees(0.01 * x[n_terms:n_terms + 3]) if n_mount else 0.0
    mount[3:] = 0.01 * x[n_terms + 3:n_terms + 6] if n_mount == 6 else 0.0
    k = np.zeros(2)
    k[:n_terms] = x[:n_terms]
    return _Model(RadialDistortion(*(float(v) for v in k)), CameraMount.from_vector(mount), n_terms)


def _fit(pairs: list[PairMatches], config: LensConfig, n_terms: int, n_mount: int, poses_I44: np.ndarray) -> _Model:
    """k1 alone (``n_terms`` 1), k1 and k2 (2) or no lens (0), with the mount's rotation (``n_mount``
    3), rotation and translation (6) or no mount (0), by robust least squares from zero."""
    def residuals(x: np.ndarray) -> np.ndarray:
        return _epipolar_all(pairs, _model_of(x, n_terms, n_mount), poses_I44)

    x_scale = np.r_[np.full(n_terms, 0.05), np.ones(n_mount)]
    fit = least_squares(residuals, np.zeros(n_terms + n_mount), loss="cauchy", f_scale=config.robust_px,
                        diff_step=1e-4, x_scale=x_scale)
    return _model_of(fit.x, n_terms, n_mount)


def _choose_mount(fit_half: list[PairMatches], check_half: list[PairMatches], poses_I44: np.ndarray,
                  config: LensConfig, lens: _Model, lens_cost: float) -> tuple[int, str, float]:
    """The mount's free parameters (3 or 6; 0: no mount), why, and the held-out cost with it. The rotation, or the rotation
    and the translation where the translation lowers the held-out cost at all (an offset is
    seen only through the pairs' turns, so its gain is small even where it matters), must lower
    the held-out cost by ``min_gain`` from the lens alone, and a fit on the held-out half must
    find the same mount."""
    trials = {n: _fit(fit_half, config, lens.n_terms, n, poses_I44) for n in (3, 6)}
    costs = {n: _robust_cost(check_half, t, poses_I44, config.robust_px) for n, t in trials.items()}
    n_mount = 6 if costs[6] < costs[3] else 3
    trial, gain = trials[n_mount], 1.0 - costs[n_mount] / lens_cost
    found = f"{trial.mount.angle_deg:.2f} deg, {100 * trial.mount.offset_m:.1f} cm"
    if gain < config.min_gain:
        return 0, (f"a mount of {found} lowered the held-out pairs' cost by {100 * gain:.1f} % "
                   f"(< {100 * config.min_gain:.0f} %): none kept"), lens_cost
    other = _fit(check_half, config, lens.n_terms, n_mount, poses_I44).mount
    turn = np.linalg.norm(np.subtract(trial.mount.rotation_deg, other.rotation_deg))
    shift = np.linalg.norm(np.subtract(trial.mount.translation_m, other.translation_m))
    if turn > config.mount_agreement_deg or shift > config.mount_agreement_m:
        return 0, (f"the two halves of the pairs found mounts {turn:.2f} deg and {100 * shift:.1f} cm apart "
                   f"(> {config.mount_agreement_deg:g} deg or {100 * config.mount_agreement_m:g} cm): "
                   "the poses' errors are not a fixed mount; none kept"), lens_cost
    return n_mount, "ok", costs[n_mount]


def estimate_lens(frames: Sequence[Frame], config: LensConfig | None = None) -> LensEstimate:
    """The radial distortion, and the camera's mount on its pose frame, that make the posed
    ``frames`` agree with their poses best.

    Fits on half of the image pairs and keeps a distortion only if it lowers the other half's
    epipolar cost by ``min_gain``; a mount likewise, beyond the distortion's gain, and only if
    the other half, fitted on its own, finds the same mount. Then fits what was kept on all
    pairs. Returns zero distortion and no mount, with the reasons, when the poses give no usable
    pairs, the images too few matches, or the fits no gain.
    """
    cfg = config or LensConfig()
    t0 = time.perf_counter()

    def result(distortion: RadialDistortion, accepted: bool, reason: str, **kw) -> LensEstimate:
        return LensEstimate(distortion, accepted, reason, seconds=time.perf_counter() - t0, **kw)

    poses = np.stack([frame_pose(frames, i) for i in range(len(frames))])
    pairs = select_pairs(poses, cfg)
    if len(pairs) < 2:
        return result(RadialDistortion(), False, f"only {len(pairs)} image pairs with a baseline >= "
                      f"{cfg.min_baseline_m} m and {cfg.min_angle_deg}-{cfg.max_angle_deg} deg of rotation")
    matches = match_pairs(frames, pairs, cfg)
    n_matches = sum(len(p.xa_N2) for p in matches)
    counts = dict(n_pairs=len(matches), n_matches=n_matches)
    if len(matches) < 2 or n_matches < cfg.min_matches:
        return result(RadialDistortion(), False, f"{n_matches} matches in {len(matches)} pairs, need "
                      f"{cfg.min_matches}", **counts)
    pinhole = _Model(RadialDistortion(), CameraMount(), 0)
    before = float(np.median(_epipolar_all(matches, pinhole, poses)))
    # k1 alone or k1 and k2: over the field of view of a normal lens the two terms trade off, and
    # with few matches the two-term fit can wander. The pairs not fitted on choose, as they decide
    # whether to keep a distortion at all.
    fit_half, check_half = matches[0::2], matches[1::2]
    pinhole_cost = _robust_cost(check_half, pinhole, poses, cfg.robust_px)
    trials = [_fit(fit_half, cfg, n_terms, 0, poses) for n_terms in (1, 2)]
    costs = [_robust_cost(check_half, t, poses, cfg.robust_px) for t in trials]
    best = int(np.argmin(costs))
    trial, gain = trials[best], 1.0 - costs[best] / pinhole_cost
    counts.update(median_px_before=before, held_out_gain=gain)
    lens, lens_cost, reason = trial, costs[best], "ok"
    if gain < cfg.min_gain:
        lens, lens_cost = pinhole, pinhole_cost
        reason = (f"the fitted k1={trial.distortion.k1:.3f}, k2={trial.distortion.k2:.3f} lowered the held-out "
                  f"pairs' cost by {100 * gain:.1f} % (< {100 * cfg.min_gain:.0f} %): pinhole kept")
    n_mount, mount_reason, with_lens = 0, "not estimated", lens_cost
    if cfg.estimate_mount:
        n_mount, mount_reason, with_lens = _choose_mount(fit_half, check_half, poses, cfg, lens, lens_cost)
    if n_mount and lens.n_terms:
        # A mount bends the pairs too, and a lens fitted without it may have taken up some of
        # that: the lens stays only if it still helps with the mount.
        alone = _robust_cost(check_half, _fit(fit_half, cfg, 0, n_mount, poses), poses, cfg.robust_px)
        if with_lens > (1.0 - cfg.min_gain) * alone:
            reason = (f"the fitted k1={lens.distortion.k1:.3f}, k2={lens.distortion.k2:.3f} lowered the held-out "
                      f"pairs' cost by {100 * (1.0 - with_lens / alone):.1f} % (< {100 * cfg.min_gain:.0f} %) beyond "
                      "the camera mount: pinhole kept")
            lens = pinhole
    if lens.n_terms == 0 and n_mount == 0:
        return result(RadialDistortion(), False, reason, mount_reason=mount_reason, **counts)
    model = _fit(matches, cfg, lens.n_terms, n_mount, poses)
    d, mount = model.distortion, model.mount
    if max(abs(d.k1), abs(d.k2)) > cfg.max_abs_coefficient:
        return result(RadialDistortion(), False, f"fit k1={d.k1:.3f}, k2={d.k2:.3f} is beyond "
                      f"{cfg.max_abs_coefficient}: pinhole kept", mount_reason="not kept with the lens", **counts)
    if not mount.within_limits:
        mount_reason = (f"the fitted mount of {mount.angle_deg:.2f} deg and {100 * mount.offset_m:.1f} cm is beyond "
                        f"{MAX_MOUNT_DEG:g} deg or {100 * MAX_MOUNT_M:g} cm: none kept")
        if lens.n_terms == 0:
            return result(RadialDistortion(), False, reason, mount_reason=mount_reason, **counts)
        model = _fit(matches, cfg, lens.n_terms, 0, poses)
        d, mount = model.distortion, CameraMount()
    after = float(np.median(_epipolar_all(matches, model, poses)))
    return result(d, lens.n_terms > 0, reason, mount=mount, mount_accepted=not mount.is_identity,
                  mount_reason=mount_reason, median_px_after=after, **counts)


def lens_summary(estimate: LensEstimate) -> str:
    """One line on what ``estimate_lens`` did, for logs and command-line output."""
    if estimate.accepted:
        d = estimate.distortion
        text = f"radial distortion k1={d.k1:.4f} k2={d.k2:.4f} removed"
    else:
        text = f"pinhole kept ({estimate.reason})"
    if estimate.mount_accepted:
        text += f"; {mount_summary(estimate.mount)} corrected"
    elif estimate.mount_reason != "not estimated":
        text += f"; no camera mount ({estimate.mount_reason})"
    if estimate.median_px_after is not None:
        text += (f": epipolar distance of {estimate.n_matches} matches in {estimate.n_pairs} mapping pairs "
                 f"{estimate.median_px_before:.2f} -> {estimate.median_px_after:.2f} px (median), "
                 f"{estimate.seconds:.1f} s")
    return text


def mount_summary(mount: CameraMount) -> str:
    """The camera's turn and offset from its pose frame, in words."""
    r, t = np.round(mount.rotation_deg, 2), np.round(100 * np.asarray(mount.translation_m), 1)
    return (f"camera turned {mount.angle_deg:.2f} deg (rotation vector {r.tolist()} deg) and offset "
            f"{100 * mount.offset_m:.1f} cm ({t.tolist()} cm) from its pose frame")
