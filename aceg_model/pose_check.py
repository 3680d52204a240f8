"""Do the mapping poses agree with the mapping images? A report for the user, not a correction.

Mapping trusts its poses: every landmark is triangulated from them. A pose source (odometry, a
SLAM system, a motion-capture rig) can be locally off, for a fraction of a second or a stretch,
and nothing in the images says so unless they are compared with it. Two images taken a moment
apart show the same points; matched SIFT points must then lie on each other's epipolar lines
as the two poses draw them. The matches are chosen by an essential-matrix RANSAC that does not
use the poses, so a pose error shows as distance from the lines instead of as lost matches.

Only the part of a pose error that moves points across their epipolar lines shows: a pan of a
camera moving sideways slides points along them and stays unseen. And only a change of error
between the two images shows: a stretch whose poses are all off by the same rotation is flagged
at its two edges, where its images meet correct ones, not inside.

On the 7-Scenes kitchen, images a moment apart agree with their ground-truth poses to 0.8 px
(median), but mapping images 807-842 disagree by up to 12 px (models/README.md, "The kitchen's
ground truth checked against its own images"). Mapping reports such stretches
(``MappingReport.pose_check``), so a user knows which part of a map to distrust.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from aceg_model.frames import Frame
from aceg_model.geometry import pose_error
from aceg_model.lens import LensConfig, PairMatches, RadialDistortion, epipolar_px, frame_pose, match_pairs, normalized


@dataclass(frozen=True)
class PoseCheckConfig:
    """Which image pairs ``check_poses`` compares and when it warns."""

    enabled: bool = True
    max_pairs: int = 100  # pairs matched, spread evenly over the sequence; ~0.1 s each at 640x480
    # The pair needs parallax for its epipolar lines to exist; over 2 cm, a millimetre of position
    # noise turns them by degrees (frames 96-99 of the kitchen read 16 px), over 5 cm it does not.
    min_baseline_m: float = 0.05
    max_angle_deg: float = 30.0  # and enough overlap to match
    max_gap: int = 30  # the second image is within this many images of the first (a moment apart)
    min_inliers: int = 30  # pairs with fewer RANSAC-consistent matches say nothing
    ransac_px: float = 1.0  # the essential-matrix RANSAC's threshold
    # A pair whose matches lie farther than this from the poses' epipolar lines (median) is
    # flagged: about twice what the kitchen's consistent stretches show at the 90th percentile.
    warn_px: float = 3.0

    def __post_init__(self) -> None:
        if self.max_pairs < 1 or self.max_gap < 1 or self.min_inliers < 8:
            raise ValueError(f"need max_pairs >= 1, max_gap >= 1 and min_inliers >= 8, got {self.max_pairs}, "
                             f"{self.max_gap}, {self.min_inliers}")
        if not (self.min_baseline_m > 0 and 0 < self.max_angle_deg <= 180 and self.ransac_px > 0
                and self.warn_px > 0):
            raise ValueError("min_baseline_m, max_angle_deg (<= 180), ransac_px and warn_px must be > 0")


@dataclass
class PairCheck:
    first: int  # image indices, in the order mapping was given them
    second: int
    median_px: float  # distance of the pair's consistent matches from the poses' epipolar lines
    n_matches: int
    names: tuple[str, str] = ("", "")  # the two frames' names, where they have them

    def label(self, which: int) -> str:
        return self.names[which] or str((self.first, self.second)[which])


@dataclass
class PoseCheck:
    """What ``check_poses`` found: every pair checked, and the flagged stretches (runs of
    consecutive pairs over ``warn_px``)."""

    pairs: list[PairCheck] = field(default_factory=list)
    flagged: list[list[PairCheck]] = field(default_factory=list)
    warn_px: float = PoseCheckConfig.warn_px
    seconds: float = 0.0

    @property
    def median_px(self) -> float | None:
        return float(np.median([p.median_px for p in self.pairs])) if self.pairs else None

    def to_json(self) -> dict:
        """For reports (``aceg-eval``'s JSON)."""
        return {"median_px": self.median_px, "n_pairs": len(self.pairs), "warn_px": self.warn_px,
                "flagged": [dict(zip(("first", "last", "worst_px"), _ends(run))) for run in self.flagged]}


def _ends(run: list[PairCheck]) -> tuple[str, str, float]:
    """A flagged stretch's first image, last image and worst median distance (px)."""
    return run[0].label(0), run[-1].label(1), max(p.median_px for p in run)


def select_moment_pairs(poses_I44: np.ndarray, config: PoseCheckConfig) -> list[tuple[int, int]]:
    """Up to ``max_pairs`` pairs (i, j): i evenly spaced over the sequence, j the first later image
    within ``max_gap`` with a baseline of ``min_baseline_m`` and a turn under ``max_angle_deg``."""
    n = len(poses_I44)
    if n < 2:
        return []
    pairs = []
    for i in np.unique(np.linspace(0, n - 2, min(n - 1, config.max_pairs)).round().astype(int)):
        for j in range(i + 1, min(n, i + 1 + config.max_gap)):
            baseline_m, turn_deg = pose_error(poses_I44[j], poses_I44[i])
            if baseline_m >= config.min_baseline_m:
                if turn_deg <= config.max_angle_deg:
                    pairs.append((int(i), j))
                break
    return pairs


def consistent_matches(pairs: list[PairMatches], distortion: RadialDistortion, min_inliers: int,
                       ransac_px: float) -> list[PairMatches]:
    """Each pair's matches that an essential matrix of their own explains (the poses play no part),
    for the pairs with at least ``min_inliers`` of them. The pairs' RANSACs run on a thread each
    core (OpenCV releases the GIL; its RANSAC is seeded per call, so the result is the same)."""
    def consistent(pair: PairMatches) -> PairMatches | None:
        if len(pair.xa_N2) < min_inliers:
            return None
        na = normalized(pair.xa_N2, pair.intrinsics_a, distortion)
        nb = normalized(pair.xb_N2, pair.intrinsics_b, distortion)
        f = 0.5 * (pair.intrinsics_a.fx + pair.intrinsics_a.fy)
        _, mask = cv2.findEssentialMat(na, nb, np.eye(3), cv2.RANSAC, 0.999, ransac_px / f)
        keep = np.zeros(len(na), dtype=bool) if mask is None else mask.ravel() > 0
        return replace(pair, xa_N2=pair.xa_N2[keep], xb_N2=pair.xb_N2[keep]) if keep.sum() >= min_inliers else None

    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 8))) as pool:
        return [p for p in pool.map(consistent, pairs) if p is not None]


def check_poses(frames: Sequence[Frame], distortion: RadialDistortion | None = None,
                config: PoseCheckConfig | None = None) -> PoseCheck:
    """Compare the poses of images taken a moment apart with what their matched points say
    (``distortion``: the lens, as ``aceg_model.lens`` estimated it, removed before comparing)."""
    cfg = config or PoseCheckConfig()
    distortion = distortion or RadialDistortion()
    t0 = time.perf_counter()
    poses = np.stack([frame_pose(frames, i) for i in range(len(frames))])
    # Matching as the lens estimate does, but keeping matches whatever the poses say.
    matching = replace(LensConfig(), max_epipolar_px=float("inf"))
    checked = [PairCheck(*pair.frames_ab, float(np.median(epipolar_px(pair, distortion))), len(pair.xa_N2),
                         pair.names_ab)
               for pair in consistent_matches(match_pairs(frames, select_moment_pairs(poses, cfg), matching),
                                              distortion, cfg.min_inliers, cfg.ransac_px)]
    return PoseCheck(checked, _stretches(checked, cfg.warn_px), cfg.warn_px, time.perf_counter() - t0)


def _stretches(pairs: list[PairCheck], warn_px: float) -> list[list[PairCheck]]:
    """Runs of consecutive pairs over ``warn_px``."""
    out: list[list[PairCheck]] = []
    run: list[PairCheck] = []
    for p in pairs:
        if p.median_px > warn_px:
            run.append(p)
        elif run:
            out.append(run)
            run = []
    return out + ([run] if run else [])


def pose_check_summary(check: PoseCheck) -> str:
    """One line for logs and command-line output."""
    if not check.pairs:
        return "mapping poses not checked (no image pairs a moment apart matched)"
    text = (f"mapping poses agree with the images to {check.median_px:.2f} px (median over {len(check.pairs)} "
            f"pairs a moment apart, {check.seconds:.1f} s)")
    if check.flagged:
        text += f"; they disagree by more than {check.warn_px:g} px between " + ", ".join(
            "images {} and {} (up to {:.1f} px)".format(*_ends(run)) for run in check.flagged)
        text += ": landmarks seeded there may be off"
    return text
