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
