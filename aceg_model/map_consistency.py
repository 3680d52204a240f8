"""How far a map's own poses disagree between its visits, as a covariance floor for localization.

The localizer's covariance comes from its inliers' pixel residuals. It does not see how far the
map's landmarks are off, and on real data that is most of the error: where the tracker that
gave the mapping poses drifted between two passes of a place, each pass placed its landmarks in
its own frame. A query sees that disagreement as a pose error that its residuals cannot show.

Mapping measures it on its own images. A few mapping images ("probes") are localized against
the landmarks of the *other* visits only (``aceg_model.visits``), and the localized pose is
compared with the image's given pose. What is left is how the visits disagree (plus the
localizer's own noise). The second moment of those differences, without the gross failures
(a wrong match is not the map's inconsistency), is the floor. The map stores it, and the
localizer adds it to every pose's covariance (``PnPConfig.map_floor``).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial.transform import Rotation

from aceg_model.frames import Frame
from aceg_model.metrics import position_sigma_cm
from aceg_model.model import AcegModel
from aceg_model.pnp import PnPConfig

if TYPE_CHECKING:
    from aceg_model.mapping import SceneMap


@dataclass(frozen=True)
class ConsistencyConfig:
    """How mapping measures its visits' disagreement (``MappingConfig.consistency``)."""

    enabled: bool = True
    probes: int = 40  # mapping images localized, evenly spread over the sequence
    min_probes: int = 10  # fewer localized probes than this give no floor
    # Probes whose position error is over this many times the median, and over min_gate_m, are
    # gross failures (a wrong match, not the visits' disagreement) and are left out. For
    # Gaussian errors 3x the median is 4.6 standard deviations, so it keeps them all; on a
    # single-pass generated room (exact poses) 2 of 15 probes were metres off and alone made a
    # 16 cm floor. min_gate_m keeps a disagreement that only some probes show (half of the
    # visits shifted by 5 cm) where the median alone would call it a failure.
    gate: float = 3.0
    min_gate_m: float = 0.10
    # A probe needs this many landmarks of other visits to be tried at all (a single-pass
    # scan has none: its map has no second visit to disagree with).
    min_landmarks: int = 1000

    def __post_init__(self) -> None:
        if self.probes < 1 or self.min_probes < 1 or self.min_probes > self.probes:
            raise ValueError(f"need 1 <= min_probes <= probes, got {self.min_probes}, {self.probes}")
        if not (np.isfinite(self.gate) and self.gate >= 1.0):
            raise ValueError(f"gate must be >= 1 (times the median error), got {self.gate}")
        if not (np.isfinite(self.min_gate_m) and self.min_gate_m >= 0.0):
            raise ValueError(f"min_gate_m must be >= 0 m, got {self.min_gate_m}")
        if self.min_landmarks < 1:
            raise ValueError(f"min_landmarks must be >= 1, got {self.min_landmarks}")


@dataclass
class ConsistencyReport:
    """What :func:`map_consistency` found (``MappingReport.consistency``)."""

    n_probes: int  # probes tried (with enough landmarks of other visits)
    n_localized: int
    covariance_66: np.ndarray | None  # the floor (ROS order, map frame); None: too few probes
    median_trans_cm: float
    median_rot_deg: float
    seconds: float

    def to_json(self) -> dict:
        """The summary numbers, for the map file's metadata and reports (strict JSON: None where
        there is no number). Not the floor itself: the map file keeps that once, as ``map_floor``."""
        return {"n_probes": self.n_probes, "n_localized": self.n_localized, "sigma_cm": _number(self.sigma_cm),
                "median_trans_cm": _number(self.median_trans_cm), "median_rot_deg": _number(self.median_rot_deg),
                "seconds": self.seconds}

    @property
    def sigma_cm(self) -> float:
        """Position standard deviation of the floor along its least certain direction (NaN: none)."""
        return float("nan") if self.covariance_66 is None else position_sigma_cm(self.covariance_66)


def _number(x: float) -> float | None:
    return x if np.isfinite(x) else None


def consistency_summary(report: ConsistencyReport | None) -> str:
    """One line for logs and CLIs."""
    if report is None:
        return "visits not compared (no visits, or switched off)"
    if report.n_probes == 0:
        return "visits not compared: no mapping image has enough landmarks of other visits (a single pass?)"
    text = (f"{report.n_localized} of {report.n_probes} mapping images localized against the other visits' "
            f"landmarks")
    if report.n_localized:
        text += f", {report.median_trans_cm:.1f} cm / {report.median_rot_deg:.2f} deg from their poses (median)"
    if report.covariance_66 is None:
        return text + "; too few for a covariance floor"
    return text + f"; covariance floor {report.sigma_cm:.1f} cm (largest position sigma)"


def pose_difference(T_a: np.ndarray, T_b: np.ndarray) -> np.ndarray:
    """6-vector ``(dp, dtheta)`` with ``p_a = p_b + dp`` and ``R_a = exp([dtheta]x) R_b``: the
    perturbation of ``aceg_model.pnp.pose_covariance`` (world axes), metres and radians."""
    d_theta = Rotation.from_matrix(T_a[:3, :3] @ T_b[:3, :3].T).as_rotvec()
    return np.concatenate([T_a[:3, 3] - T_b[:3, 3], d_theta])


def floor_covariance(errors_N6: np.ndarray, gate: float, min_gate_m: float = 0.0) -> np.ndarray:
    """Second moment of pose differences whose position error is within ``gate`` x the median
    or within ``min_gate_m``."""
    norm_N = np.linalg.norm(errors_N6[:, :3], axis=1)
    kept = errors_N6[norm_N <= max(gate * np.median(norm_N), min_gate_m)]
    return kept.T @ kept / len(kept)


def map_consistency(model: AcegModel, scene_map: "SceneMap", frames: Sequence[Frame],
                    config: ConsistencyConfig | None = None, pnp: PnPConfig | None = None) -> ConsistencyReport:
    """Localize probes of ``frames`` (the mapping images as given, in ``scene_map``'s order: the
    localizer removes the lens itself) against the landmarks of the other visits; the floor.

    ``pnp``: the localizer settings the map will be used with (default: ``PnPConfig()``), so
    that the floor measures the poses they give; the floor itself is left out of the probes.
    """
    from aceg_model.localizer import Localizer  # the localizer imports mapping, which imports this module

    cfg = config or ConsistencyConfig()
    t0 = time.perf_counter()
    views = scene_map.views
    if views is None or len(frames) != len(views.stamps_I):  # no visits, or not this map's images: no floor
        return ConsistencyReport(0, 0, None, float("nan"), float("nan"), 0.0)
    localizer = Localizer(model, scene_map, replace(pnp or PnPConfig(), map_floor=False))
    seed_stamps_M = views.stamps_I[views.seed_view_M]
    errors, tried = [], 0
    for i in np.unique(np.linspace(0, len(frames) - 1, min(cfg.probes, len(frames))).round().astype(int)):
        others_M = np.abs(seed_stamps_M - views.stamps_I[i]) > views.window_s
        if others_M.sum() < cfg.min_landmarks:
            continue
        tried += 1
        frame = frames[i]
        res = localizer.localize(frame.image, frame.intrinsics, allowed_landmarks=others_M)
        if res.success:
            errors.append(pose_difference(res.T_world_cam, frame.T_world_cam))
    seconds = time.perf_counter() - t0
    if not errors:
        return ConsistencyReport(tried, 0, None, float("nan"), float("nan"), seconds)
    e_N6 = np.array(errors)
    cov = floor_covariance(e_N6, cfg.gate, cfg.min_gate_m) if len(errors) >= cfg.min_probes else None
    return ConsistencyReport(tried, len(errors), cov, 100.0 * float(np.median(np.linalg.norm(e_N6[:, :3], axis=1))),
                             float(np.degrees(np.median(np.linalg.norm(e_N6[:, 3:], axis=1)))), seconds)
