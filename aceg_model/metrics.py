"""Relocalization accuracy figures with stable keys (used by aceg-eval and aceg-replay)."""
from __future__ import annotations

import numpy as np

THRESHOLDS = ((5, 5), (10, 10))  # (cm, deg) pairs reported as pct_<cm>cm_<deg>deg


def accuracy_summary(trans_err_m: list[float | None], rot_err_deg: list[float | None]) -> dict:
    """Percentages within thresholds, medians and failures; ``None`` marks a frame with no pose.

    Failed frames count against the percentages (a relocalizer that refuses
    is not accurate on that frame) and are left out of the medians.
    """
    if len(trans_err_m) != len(rot_err_deg):
        raise ValueError("trans_err_m and rot_err_deg must have the same length")
    n = len(trans_err_m)
    ok = [(t, r) for t, r in zip(trans_err_m, rot_err_deg) if t is not None and r is not None]
    t_cm = np.array([100.0 * t for t, _ in ok])
    r_deg = np.array([r for _, r in ok])
    out: dict = {"n_query": n, "n_failed": n - len(ok)}
    for cm, deg in THRESHOLDS:
        hit = int(np.sum((t_cm <= cm) & (r_deg <= deg))) if len(ok) else 0
        out[f"pct_{cm}cm_{deg}deg"] = 100.0 * hit / n if n else float("nan")
    out["median_trans_cm"] = float(np.median(t_cm)) if len(ok) else float("nan")
    out["median_rot_deg"] = float(np.median(r_deg)) if len(ok) else float("nan")
    return out


CHI2_3DOF_95 = 7.815  # 95 % quantile of the chi-square distribution with 3 degrees of freedom


def position_sigma_cm(covariance_66: np.ndarray) -> float:
    """Position standard deviation (cm) along a 6x6 pose covariance's least certain direction."""
    C_33 = np.asarray(covariance_66, dtype=np.float64)[:3, :3]
    return 100.0 * float(np.sqrt(np.linalg.eigvalsh(C_33)[-1]))


def position_nees(T_est: np.ndarray, covariance_66: np.ndarray, T_gt: np.ndarray) -> float:
    """The normalized squared position error ``e^T C^-1 e`` (NEES; chi-square with 3 degrees of
    freedom where the covariance is right)."""
    C_33 = np.asarray(covariance_66, dtype=np.float64)[:3, :3]
    e_3 = T_est[:3, 3] - T_gt[:3, 3]
    return float(e_3 @ np.linalg.solve(C_33, e_3))


def position_consistency(T_est: np.ndarray, covariance_66: np.ndarray, T_gt: np.ndarray) -> tuple[float, float]:
    """How a pose's covariance covers its position error: ``position_sigma_cm`` and ``position_nees``."""
    return position_sigma_cm(covariance_66), position_nees(T_est, covariance_66, T_gt)


def covariance_summary(nees: list[float | None]) -> dict:
    """``nees_trans_median`` and ``pct_nees_trans_within_95`` of the frames that have one (NaN
    without any): where the covariances are right, 2.37 and 95 %."""
    values = np.array([x for x in nees if x is not None], dtype=np.float64)
    if not len(values):
        return {"nees_trans_median": float("nan"), "pct_nees_trans_within_95": float("nan")}
    return {"nees_trans_median": float(np.median(values)),
            "pct_nees_trans_within_95": 100.0 * float(np.mean(values <= CHI2_3DOF_95))}
