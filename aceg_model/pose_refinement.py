"""Mapping poses corrected by the mapping images: an epipolar bundle adjustment.

Mapping triangulates every landmark from its poses, so a pose source that is a few millimetres
and a tenth of a degree off per image (a tracker, odometry) blurs every landmark by centimetres:
on generated room 900001 mapped from poses jittered by 3 mm and 0.1 deg per image, new
viewpoints fall from 26.7 % within 5 cm / 5 deg (true poses) to 0 % (models/README.md, "Pose
jitter"). The images themselves say how their poses relate: SIFT points matched between two
images taken near each other lie on each other's epipolar lines when the poses are right.

``refine_poses`` matches each image with a few later ones at growing baselines (4 cm to 64 cm
by default), keeps the matches an essential matrix of their own explains (as the pose check
does, so a wrong pose cannot throw out the matches that show it is wrong), then moves every
pose by a small twist in its camera frame to minimize the matches' Sampson distances (pixels,
Cauchy-robust), with a weak prior that holds each pose near the given one. The prior also fixes
what epipolar geometry cannot see: where the whole set of poses stands, how it is turned and
its scale. It is a bundle adjustment without points: no landmark is triangulated, so nothing
here depends on the model.

Accurate poses (a survey's, a renderer's) leave the solver nothing but the matches' noise to
fit, and moving them by it costs accuracy (Strecha Herz-Jesu lost 2-3 of 13 frames at 5 cm).
So the corrections are kept only where they explain the matches markedly better
(``PoseRefinementConfig.min_gain``); elsewhere the given poses are returned as they were.

The solver is Levenberg-Marquardt on the sparse normal equations: each image pair couples the
twelve parameters of its two poses only. Its Jacobian is exact (forward-mode automatic
differentiation of each pair's residuals at a zero twist), so it converges in tens of
iterations where a finite-difference trust-region solver (the first experiment) had not in 150.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from scipy.spatial.transform import Rotation

from aceg_model.frames import Frame
from aceg_model.geometry import pose_error
from aceg_model.lens import LensConfig, PairMatches, RadialDistortion, frame_pose, match_pairs, normalized
from aceg_model.pose_check import consistent_matches


@dataclass(frozen=True)
class PoseRefinementConfig:
    """Which image pairs ``refine_poses`` matches and how far it lets a pose move."""

    enabled: bool = True
    # Each image is paired with the first later image at least this far from it, for each baseline:
    # the short ones tie neighbours together, the long ones carry the geometry along the sequence.
    # Under 4 cm a millimetre of position noise turns the epipolar lines by degrees.
    baselines_m: tuple[float, ...] = (0.04, 0.08, 0.16, 0.32, 0.64)
    max_gap: int = 60  # the later image is within this many images
    max_angle_deg: float = 45.0  # and turned by no more than this, so that the pair still matches
    max_features: int = 1500  # SIFT keypoints per image
    min_inliers: int = 30  # pairs with fewer matches an essential matrix of their own explains are left out
    ransac_px: float = 1.0  # that essential matrix's RANSAC threshold
    max_matches: int = 150  # per pair, evenly over its consistent matches: enough, and a pair's weight bounded
    sigma_px: float = 0.5  # a match's Sampson distance is read in units of this
    robust_px: float = 1.0  # scale of the Cauchy loss (RANSAC kept matches within ransac_px of its own model)
    # The prior: how far a pose may move from the given one at the cost of one matched pixel's
    # error; about a tracker's error per image. Where the images cannot tell a small turn from a
    # small shift (little depth in view), the pairs' noise moves the poses that way: with 1 cm and
    # 0.3 deg here the true poses of generated room 900003 moved up to 15 mm and 0.33 deg, with
    # these up to 9.6 mm and 0.21 deg (median 1.2 mm, 0.03 deg), while the jittered poses of room
    # 900001 came out closer to the truth as well (median 2.0 mm against 2.3 mm).
    prior_m: float = 0.003
    prior_deg: float = 0.1
    # The anchor: the given poses are right on average over every stretch of 2 x anchor_images + 1
    # images (in the order mapping is given them, the capture order), so the images correct how
    # each pose sits among its neighbours (a tracker's jitter) but do not bend the whole path.
    # Without it, the pairs' small errors add up along the sequence like odometry's (on generated
    # room 900003 with the prior at 1 cm and 0.3 deg, the true poses came out up to 18 mm and
    # 0.46 deg off without it, 15 mm and 0.33 deg with it). 0: no anchor.
    anchor_images: int = 10
    anchor_m: float = 0.001  # how far the stretch's mean may move
    anchor_deg: float = 0.02
    max_iterations: int = 50
    tolerance: float = 1e-6  # stop when an accepted step lowers the cost by less than this fraction
    # The corrected poses are kept only where they lower the matches' median Sampson distance by
    # this fraction: accurate poses leave the solver only the matches' noise to fit, and moving
    # them by that costs accuracy. Measured (given -> corrected): true poses of generated rooms
    # -8 to -2 % (the median rises), Strecha Herz-Jesu 0.14 -> 0.13 px (6-9 %; mapped from the corrected
    # poses it lost 2-3 of 13 frames at 5 cm over three maps); KITTI 06's GPS/INS poses 0.25 -> 0.13 px (48-51 %).
    min_gain: float = 0.25

    def __post_init__(self) -> None:
        if not self.baselines_m or min(self.baselines_m) <= 0:
            raise ValueError(f"baselines_m must be a non-empty tuple of distances > 0 m, got {self.baselines_m}")
        if self.anchor_images < 0 or not (self.anchor_m > 0 and self.anchor_deg > 0):
            raise ValueError(f"need anchor_images >= 0 and anchor_m, anchor_deg > 0, got {self.anchor_images}, "
                             f"{self.anchor_m}, {self.anchor_deg}")
        if self.max_gap < 1 or self.min_inliers < 8 or self.max_matches < 8 or self.max_iterations < 1:
            raise ValueError(f"need max_gap >= 1, min_inliers >= 8, max_matches >= 8 and max_iterations >= 1, got "
                             f"{self.max_gap}, {self.min_inliers}, {self.max_matches}, {self.max_iterations}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if not (0 < self.max_angle_deg <= 180 and self.ransac_px > 0 and self.sigma_px > 0 and self.robust_px > 0
                and self.prior_m > 0 and self.prior_deg > 0 and 0 < self.tolerance < 1):
            raise ValueError("max_angle_deg (<= 180), ransac_px, sigma_px, robust_px, prior_m, prior_deg must be > 0 "
                             "and tolerance in (0, 1)")


@dataclass
class PoseRefinement:
    """What ``refine_poses`` did: the corrected camera-to-world poses and how they changed."""

    poses_I44: np.ndarray
    n_pairs: int = 0
    n_matches: int = 0
    median_px_before: float | None = None  # the matches' Sampson distance (px) under the given poses
    median_px_after: float | None = None  # and under the corrected ones
    median_move_mm: float = 0.0  # how far the poses moved (median over images)
    median_turn_deg: float = 0.0
    iterations: int = 0
    seconds_match: float = 0.0
    seconds_solve: float = 0.0
    accepted: bool = False  # the corrected poses are in poses_I44 (else the given ones are)
    gain: float | None = None  # the relative drop of the median Sampson distance the correction gave

    def to_json(self) -> dict:
        """For reports (``aceg-eval``'s JSON, the map's metadata)."""
        return {k: v for k, v in self.__dict__.items() if k != "poses_I44"}


def select_refinement_pairs(poses_I44: np.ndarray, config: PoseRefinementConfig) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j: for each image i and each of ``baselines_m``, the first later image
    within ``max_gap`` at least that far away; left out where it is turned by over ``max_angle_deg``."""
    pairs = set()
    for i in range(len(poses_I44) - 1):
        later = range(i + 1, min(len(poses_I44), i + 1 + config.max_gap))
        moved = [pose_error(poses_I44[j], poses_I44[i]) for j in later]
        for baseline in config.baselines_m:
            first = next((j for j, (dist_m, _) in zip(later, moved) if dist_m >= baseline), None)
            if first is not None and moved[first - i - 1][1] <= config.max_angle_deg:
                pairs.add((i, first))
    return sorted(pairs)


def _hat(w_N3: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices of a batch of 3-vectors."""
    z = torch.zeros_like(w_N3[..., 0])
    return torch.stack([torch.stack([z, -w_N3[..., 2], w_N3[..., 1]], -1),
                        torch.stack([w_N3[..., 2], z, -w_N3[..., 0]], -1),
                        torch.stack([-w_N3[..., 1], w_N3[..., 0], z], -1)], -2)


def _essential(d_12: torch.Tensor, R_i: torch.Tensor, t_i: torch.Tensor, R_j: torch.Tensor,
               t_j: torch.Tensor) -> torch.Tensor:
    """E with x_j^T E x_i = 0 for one pair, pose i moved by the twist d_12[:6] and pose j by
    d_12[6:] (rotation vector, then translation, in the camera frame). The twist enters to first
    order, which gives the exact Jacobian at d = 0."""
    eye = torch.eye(3, dtype=d_12.dtype)
    Ri, ti = R_i @ (eye + _hat(d_12[0:3])), t_i + R_i @ d_12[3:6]
    Rj, tj = R_j @ (eye + _hat(d_12[6:9])), t_j + R_j @ d_12[9:12]
    # X_j = R_ji X_i + t_ji, and E = [t_ji]_x R_ji.
    return _hat(Rj.T @ (ti - tj)) @ (Rj.T @ Ri)


# Per pair, d E / d twist at a zero twist: (P, 3, 3, 12).
_essential_jacobians = torch.func.vmap(torch.func.jacfwd(_essential, argnums=0))
_IN_IMAGE = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # a line's (a, b), not its c


def _sampson(E_P33: torch.Tensor, x_i_PM3: torch.Tensor, x_j_PM3: torch.Tensor,
             with_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signed Sampson distances (normalized units) of every pair's matches, (P, M), and where asked
    their gradients with respect to the pair's E, (P, M, 3, 3)."""
    line_j_PM3 = torch.einsum("pab,pmb->pma", E_P33, x_i_PM3)  # E x_i: the epipolar line in image j
    line_i_PM3 = torch.einsum("pab,pma->pmb", E_P33, x_j_PM3)  # E^T x_j: the line in image i
    num_PM = (x_j_PM3 * line_j_PM3).sum(-1)
    den_PM = ((line_j_PM3 * _IN_IMAGE).square().sum(-1) + (line_i_PM3 * _IN_IMAGE).square().sum(-1)).clamp_min(1e-24)
    r_PM = num_PM / den_PM.sqrt()
    if not with_gradient:
        return r_PM, None
    # d num / d E_ab = x_j,a x_i,b; d den / d E_ab = 2 (E x_i)_a x_i,b [a < 2] + 2 x_j,a (E^T x_j)_b [b < 2].
    d_num = x_j_PM3[..., :, None] * x_i_PM3[..., None, :]
    d_den = 2 * (line_j_PM3 * _IN_IMAGE)[..., :, None] * x_i_PM3[..., None, :] \
        + 2 * x_j_PM3[..., :, None] * (line_i_PM3 * _IN_IMAGE)[..., None, :]
    return r_PM, d_num / den_PM.sqrt()[..., None, None] - (0.5 * r_PM / den_PM)[..., None, None] * d_den


class _Problem:
    """The matches of all pairs, padded to one length, and the cost of a set of poses."""

    def __init__(self, pairs: list[PairMatches], distortion: RadialDistortion, poses_I44: np.ndarray,
                 config: PoseRefinementConfig) -> None:
        longest = max(len(p.xa_N2) for p in pairs)
        P = len(pairs)
        self.x_i_PM3 = torch.zeros(P, longest, 3, dtype=torch.float64)
        self.x_j_PM3 = torch.zeros(P, longest, 3, dtype=torch.float64)
        self.x_i_PM3[..., 2] = self.x_j_PM3[..., 2] = 1.0  # padding: a harmless point, weight 0
        self.mask_PM = torch.zeros(P, longest, dtype=torch.float64)
        for p, pair in enumerate(pairs):
            m = len(pair.xa_N2)
            self.x_i_PM3[p, :m, :2] = torch.from_numpy(normalized(pair.xa_N2, pair.intrinsics_a, distortion))
            self.x_j_PM3[p, :m, :2] = torch.from_numpy(normalized(pair.xb_N2, pair.intrinsics_b, distortion))
            self.mask_PM[p, :m] = 1.0
        self.ij_P2 = np.array([p.frames_ab for p in pairs])
        # Residuals in units of sigma_px, through the mean focal length of the pairs' first images.
        self.scale = float(np.mean([p.intrinsics_a.fx + p.intrinsics_a.fy for p in pairs])) / 2 / config.sigma_px
        self.robust = config.robust_px / config.sigma_px
        self.prior_sigma_6 = np.r_[np.full(3, np.deg2rad(config.prior_deg)), np.full(3, config.prior_m)]
        # The anchor's residuals: each stretch's mean offset from the given poses, in sigmas,
        # linear in the offsets: anchor @ offsets (6 per image, stacked).
        n, w = len(poses_I44), config.anchor_images
        mean_II = scipy.sparse.lil_matrix((n, n))
        for i in range(n if w else 0):
            lo, hi = max(0, i - w), min(n, i + w + 1)
            mean_II[i, lo:hi] = 1.0 / (hi - lo)
        inv_anchor_6 = 1.0 / np.r_[np.full(3, np.deg2rad(config.anchor_deg)), np.full(3, config.anchor_m)]
        self.anchor = scipy.sparse.kron(mean_II.tocsr(), scipy.sparse.diags(inv_anchor_6)).tocsr()
        self.given_I44 = poses_I44

    def _poses(self, poses_I44: np.ndarray) -> tuple[torch.Tensor, ...]:
        T = torch.from_numpy(poses_I44)
        i, j = self.ij_P2[:, 0], self.ij_P2[:, 1]
        return T[i, :3, :3], T[i, :3, 3], T[j, :3, :3], T[j, :3, 3]

    def _essentials(self, poses_I44: np.ndarray) -> torch.Tensor:
        R_i, t_i, R_j, t_j = self._poses(poses_I44)
        R_ji = R_j.transpose(1, 2) @ R_i
        t_ji = (R_j.transpose(1, 2) @ (t_i - t_j)[..., None])[..., 0]
        return _hat(t_ji) @ R_ji

    def residuals(self, poses_I44: np.ndarray) -> torch.Tensor:
        """(P, M) Sampson distances in sigmas (0 on padding)."""
        return _sampson(self._essentials(poses_I44), self.x_i_PM3, self.x_j_PM3)[0] * self.scale * self.mask_PM

    def offsets(self, poses_I44: np.ndarray) -> np.ndarray:
        """(I, 6) each pose's offset from the given one: rotation vector, translation (camera frame)."""
        R0_T = np.transpose(self.given_I44[:, :3, :3], (0, 2, 1))
        rot = Rotation.from_matrix(R0_T @ poses_I44[:, :3, :3]).as_rotvec()
        trans = np.einsum("iab,ib->ia", R0_T, poses_I44[:, :3, 3] - self.given_I44[:, :3, 3])
        return np.c_[rot, trans]

    def cost(self, poses_I44: np.ndarray) -> float:
        # Cauchy: a match far off its line (near an epipole, or a mismatch RANSAC let through) weighs little.
        robust = 0.5 * self.robust ** 2 * torch.log1p((self.residuals(poses_I44) / self.robust).square())
        offsets_I6 = self.offsets(poses_I44)
        prior, anchored = offsets_I6 / self.prior_sigma_6, self.anchor @ offsets_I6.ravel()
        return float((robust * self.mask_PM).sum()) + 0.5 * float(np.square(prior).sum() + np.square(anchored).sum())

    def normal_equations(self, poses_I44: np.ndarray) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
        """Gauss-Newton's H and g (IRLS weights of the Cauchy loss) for twists of every pose."""
        n = len(poses_I44)
        zero = torch.zeros(len(self.ij_P2), 12, dtype=torch.float64)
        dE_P3312 = _essential_jacobians(zero, *self._poses(poses_I44))
        r_PM, dr_dE_PM33 = _sampson(self._essentials(poses_I44), self.x_i_PM3, self.x_j_PM3, with_gradient=True)
        r_PM = r_PM * self.scale * self.mask_PM
        # The chain rule through E: (P, M, 12).
        J_PM12 = torch.einsum("pmab,pabk->pmk", dr_dE_PM33, dE_P3312) * self.scale
        w_PM = self.mask_PM / (1.0 + (r_PM / self.robust).square())
        A_P1212 = torch.einsum("pmk,pm,pml->pkl", J_PM12, w_PM, J_PM12).numpy()
        b_P12 = torch.einsum("pmk,pm,pm->pk", J_PM12, w_PM, r_PM).numpy()
        # Each pair's block lands on the rows and columns of its two poses' parameters.
        index_P12 = np.concatenate([6 * self.ij_P2[:, :1] + np.arange(6), 6 * self.ij_P2[:, 1:] + np.arange(6)], 1)
        rows = np.broadcast_to(index_P12[:, :, None], A_P1212.shape).ravel()
        cols = np.broadcast_to(index_P12[:, None, :], A_P1212.shape).ravel()
        H = scipy.sparse.coo_matrix((A_P1212.ravel(), (rows, cols)), shape=(6 * n, 6 * n)).tocsr()
        g = np.bincount(index_P12.ravel(), weights=b_P12.ravel(), minlength=6 * n)
        # The prior and the anchor, with the offsets' Jacobian taken as the identity (exact at the given poses).
        offsets = self.offsets(poses_I44).ravel()
        inv_sigma = np.tile(1.0 / self.prior_sigma_6, n)
        H = H + scipy.sparse.diags(inv_sigma ** 2) + (self.anchor.T @ self.anchor)
        g = g + inv_sigma ** 2 * offsets + self.anchor.T @ (self.anchor @ offsets)
        return H, g


def _moved(poses_I44: np.ndarray, d_I6: np.ndarray) -> np.ndarray:
    """Every pose moved by its twist (rotation vector, translation) in its own camera frame."""
    out = poses_I44.copy()
    out[:, :3, :3] = poses_I44[:, :3, :3] @ Rotation.from_rotvec(d_I6[:, :3]).as_matrix()
    out[:, :3, 3] = poses_I44[:, :3, 3] + np.einsum("iab,ib->ia", poses_I44[:, :3, :3], d_I6[:, 3:])
    return out


def solve_poses(pairs: list[PairMatches], distortion: RadialDistortion, poses_I44: np.ndarray,
                config: PoseRefinementConfig) -> tuple[np.ndarray, int]:
    """Levenberg-Marquardt from the given poses; returns the corrected poses and the iterations run."""
    return _solve(_Problem(pairs, distortion, poses_I44, config), config)


def _solve(problem: _Problem, config: PoseRefinementConfig) -> tuple[np.ndarray, int]:
    """``solve_poses`` on a problem already set up (its given poses are the start)."""
    poses_I44 = problem.given_I44
    poses, cost, damping = poses_I44.copy(), problem.cost(poses_I44), 1e-4
    it = 0
    for it in range(1, config.max_iterations + 1):
        H, g = problem.normal_equations(poses)
        diagonal = scipy.sparse.diags(H.diagonal())
        while True:
            step = scipy.sparse.linalg.spsolve((H + damping * diagonal).tocsc(), -g)
            trial = _moved(poses, step.reshape(-1, 6))
            trial_cost = problem.cost(trial)
            if trial_cost < cost:
                break
            damping *= 10.0
            if damping > 1e8:  # no step lowers the cost: a minimum
                return poses, it
        gain = (cost - trial_cost) / max(cost, 1e-12)
        poses, cost, damping = trial, trial_cost, max(damping / 10.0, 1e-9)
        if gain < config.tolerance:
            break
    return poses, it


def refine_poses(frames: Sequence[Frame], distortion: RadialDistortion | None = None,
                 config: PoseRefinementConfig | None = None) -> PoseRefinement:
    """Correct the camera-to-world poses of ``frames`` from their images (``distortion``: the lens,
    as ``aceg_model.lens`` estimated it). Returns the given poses unchanged where no pair matches."""
    cfg = config or PoseRefinementConfig()
    distortion = distortion or RadialDistortion()
    t0 = time.perf_counter()
    given_I44 = np.stack([frame_pose(frames, i) for i in range(len(frames))])
    matching = replace(LensConfig(), max_epipolar_px=float("inf"), max_features=cfg.max_features)
    pairs = consistent_matches(match_pairs(frames, select_refinement_pairs(given_I44, cfg), matching), distortion,
                               cfg.min_inliers, cfg.ransac_px)
    pairs = [_evenly(p, cfg.max_matches) for p in pairs]
    t_match = time.perf_counter() - t0
    if not pairs:
        return PoseRefinement(given_I44, seconds_match=t_match)
    # An image in no pair keeps its given pose: only its prior acts on it.
    t1 = time.perf_counter()
    problem = _Problem(pairs, distortion, given_I44, cfg)  # set up once: solved, then read for the report
    poses_I44, iterations = _solve(problem, cfg)
    px = [np.median(problem.residuals(p).abs().numpy()[problem.mask_PM.numpy() > 0]) * cfg.sigma_px
          for p in (given_I44, poses_I44)]
    gain = float(1.0 - px[1] / px[0]) if px[0] > 0 else 0.0
    accepted = gain >= cfg.min_gain
    if not accepted:
        poses_I44 = given_I44
    moved = [pose_error(a, b) for a, b in zip(poses_I44, given_I44)]
    return PoseRefinement(poses_I44, len(pairs), sum(len(p.xa_N2) for p in pairs), float(px[0]), float(px[1]),
                          1e3 * float(np.median([m for m, _ in moved])), float(np.median([d for _, d in moved])),
                          iterations, t_match, time.perf_counter() - t1, accepted, gain)


def _evenly(pair: PairMatches, most: int) -> PairMatches:
    """At most ``most`` of a pair's matches, spread evenly over its list."""
    if len(pair.xa_N2) <= most:
        return pair
    keep = np.linspace(0, len(pair.xa_N2) - 1, most).round().astype(int)
    return replace(pair, xa_N2=pair.xa_N2[keep], xb_N2=pair.xb_N2[keep])


def refinement_summary(refinement: PoseRefinement) -> str:
    """One line for logs and command-line output."""
    if refinement.median_px_before is None:
        return f"mapping poses not refined: no image pairs matched ({refinement.seconds_match:.1f} s)"
    r = refinement  # matched, so its gain is set
    fit = (f"{r.n_pairs} image pairs ({r.n_matches} matches): {r.median_px_before:.2f} -> {r.median_px_after:.2f} px "
           f"(median, {abs(100 * r.gain):.0f} % {'lower' if r.gain >= 0 else 'higher'})")
    seconds = f"{r.iterations} iterations, {r.seconds_match + r.seconds_solve:.0f} s"
    if not r.accepted:
        return f"mapping poses kept as given: corrected from {fit}, too little to trust, {seconds}"
    return (f"mapping poses refined from {fit}, poses moved {r.median_move_mm:.1f} mm and {r.median_turn_deg:.3f} deg "
            f"(median), {seconds}")


class PosedFrames(Sequence[Frame]):
    """A view of ``frames`` with other camera-to-world poses (``poses_I44``), images unchanged."""

    def __init__(self, frames: Sequence[Frame], poses_I44: np.ndarray) -> None:
        if len(poses_I44) != len(frames):
            raise ValueError(f"need one pose per frame: {len(poses_I44)} poses for {len(frames)} frames")
        self._frames = frames
        self.poses_I44 = poses_I44

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, i: int) -> Frame:  # type: ignore[override]
        return replace(self._frames[i], T_world_cam=self.poses_I44[i])

    def pose(self, i: int) -> np.ndarray:
        return self.poses_I44[i]
