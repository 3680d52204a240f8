"""Replay reports: per-frame results -> JSON (stable keys), a Markdown summary and PNG plots.

No ROS imports: a report can be rebuilt from its JSON anywhere
(``python -m aceg_ros.report replay.json --out DIR``).

JSON keys (``summarize``):

- the accuracy keys of ``aceg-eval`` (``aceg_model.metrics.accuracy_summary``):
  ``n_query``, ``n_failed``, ``pct_5cm_5deg``, ``pct_10cm_10deg``,
  ``median_trans_cm``, ``median_rot_deg``, and ``localize_ms_mean``. They are
  computed over the frames that have ground truth; without ground truth
  ``n_query`` is every frame, ``n_failed`` the frames without a pose, and the
  percentages and medians are null;
- ``n_frames`` (images replayed), ``n_localized`` (frames with a pose),
  ``n_without_gt``, ``has_ground_truth``;
- latency of the frames that got a pose: ``latency_p50_ms``, ``latency_p90_ms``,
  ``latency_p99_ms``, ``latency_mean_ms``, ``latency_max_ms`` (what is timed is
  in ``latency_measures``); ``throughput_fps`` (frames handled per second of
  wall time), ``pose_rate_hz`` (poses per second), ``wall_s``;
- ``frames``: one record per image, in bag order: ``stamp`` (s), ``pose``
  (``[x, y, z, qx, qy, qz, qw]`` of the camera in the map frame, or null when
  no pose came), ``gt_pose`` (same layout, or null), ``trans_err_cm`` and
  ``rot_err_deg`` (null without a pose or ground truth), ``latency_ms``,
  ``position_std_cm`` / ``rotation_std_deg`` (from the pose covariance),
  ``nees_trans`` (the position error normalized by the covariance, ``e^T C^-1 e``;
  null without a pose, ground truth or covariance), ``n_inliers`` and ``reason``
  (offline mode only; null over DDS);
- ``nees_trans_median`` and ``pct_nees_trans_within_95``: whether the covariances
  cover the errors (2.37 and 95 % where they are right);
- whatever the caller passes as ``meta`` (mode, rate, bag, map, model, ...).

NaN never reaches the JSON: missing numbers are null.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aceg_model.geometry import pose7, pose_error, pose_from_quat
from aceg_model.metrics import THRESHOLDS, accuracy_summary, covariance_summary, position_nees

PLOT_NAMES = ("trajectory", "error_over_time", "error_cdf")
ERROR_FLOOR = (0.01, 0.001)  # cm, deg: exact poses (oracle tests) still show on log axes
# Translation error bins of the trajectory colours (cm): read at a glance against the 5 / 10 cm limits.
ERROR_BINS_CM = (0.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1e9)


@dataclass
class FrameResult:
    """What happened to one replayed image."""

    stamp_ns: int  # the image header stamp (bag time)
    T_gt: np.ndarray | None = None  # ground-truth T_map_cam, 4x4, or None
    T_est: np.ndarray | None = None  # the published / computed T_map_cam, or None (no pose)
    covariance_66: np.ndarray | None = None  # ROS order, map frame (m², rad²)
    latency_ms: float | None = None
    reason: str | None = None  # why no pose (offline mode); None when unknown (DDS) or localized
    n_inliers: int | None = None


# --- numbers ---------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A JSON-safe float (None for None / NaN / inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _matrix(pose7: list[float] | None) -> np.ndarray | None:
    return None if pose7 is None else pose_from_quat(pose7[:3], pose7[3:])


def frame_record(r: FrameResult) -> dict:
    """The JSON record of one frame (see the module docstring)."""
    t_err = r_err = None
    if r.T_est is not None and r.T_gt is not None:
        dt, dr = pose_error(r.T_est, r.T_gt)
        t_err, r_err = 100.0 * dt, dr
    pos_std = rot_std = nees = None
    if r.covariance_66 is not None:
        cov = np.asarray(r.covariance_66, dtype=np.float64)
        pos_std = 100.0 * math.sqrt(max(float(np.trace(cov[:3, :3])), 0.0))
        rot_std = math.degrees(math.sqrt(max(float(np.trace(cov[3:, 3:])), 0.0)))
        if t_err is not None and np.linalg.eigvalsh(cov[:3, :3])[0] > 0:
            nees = position_nees(r.T_est, cov, r.T_gt)
    return {"stamp": r.stamp_ns * 1e-9, "pose": pose7(r.T_est), "gt_pose": pose7(r.T_gt),
            "trans_err_cm": _num(t_err), "rot_err_deg": _num(r_err), "latency_ms": _num(r.latency_ms),
            "position_std_cm": _num(pos_std), "rotation_std_deg": _num(rot_std), "nees_trans": _num(nees),
            "n_inliers": r.n_inliers, "reason": r.reason}


def summarize(results: list[FrameResult], meta: dict | None = None, wall_s: float | None = None) -> dict:
    """The replay report (JSON-ready dict): ``meta``, the summary keys, then ``frames``."""
    frames = [frame_record(r) for r in results]
    out: dict = dict(meta or {})
    out.update(summary_from_frames(frames, wall_s))
    out["frames"] = frames
    return out


def summary_from_frames(frames: list[dict], wall_s: float | None = None) -> dict:
    """Accuracy, failure, latency and throughput keys from the per-frame records."""
    with_gt = [f for f in frames if f["gt_pose"] is not None]
    localized = [f for f in frames if f["pose"] is not None]
    out: dict = {"n_frames": len(frames), "n_localized": len(localized), "n_without_gt": len(frames) - len(with_gt),
                 "has_ground_truth": bool(with_gt)}
    if with_gt:
        acc = accuracy_summary([None if f["trans_err_cm"] is None else f["trans_err_cm"] / 100.0 for f in with_gt],
                               [f["rot_err_deg"] for f in with_gt])
    else:
        acc = {"n_query": len(frames), "n_failed": len(frames) - len(localized),
               **{f"pct_{cm}cm_{deg}deg": None for cm, deg in THRESHOLDS},
               "median_trans_cm": None, "median_rot_deg": None}
    out.update({k: (_num(v) if isinstance(v, float) else v) for k, v in acc.items()})
    out.update({k: _num(v) for k, v in covariance_summary([f.get("nees_trans") for f in with_gt]).items()})
    lat = np.array([f["latency_ms"] for f in localized if f["latency_ms"] is not None], dtype=np.float64)
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        out[f"latency_{name}_ms"] = _num(np.percentile(lat, q)) if len(lat) else None
    out["latency_mean_ms"] = _num(lat.mean()) if len(lat) else None
    out["latency_max_ms"] = _num(lat.max()) if len(lat) else None
    out["localize_ms_mean"] = out["latency_mean_ms"]  # the aceg-eval name
    out["wall_s"] = _num(wall_s)
    out["throughput_fps"] = _num(len(frames) / wall_s) if wall_s else None
    out["pose_rate_hz"] = _num(len(localized) / wall_s) if wall_s else None
    return out


# --- text ------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def one_line(report: dict) -> str:
    """A one-line summary: accuracy (when there is ground truth), failures, latency, throughput."""
    parts = []
    if report["has_ground_truth"]:
        parts.append(f"5cm/5deg {_fmt(report['pct_5cm_5deg'], '.1f', '%')}, "
                     f"10cm/10deg {_fmt(report['pct_10cm_10deg'], '.1f', '%')}, median "
                     f"{_fmt(report['median_trans_cm'])} cm / {_fmt(report['median_rot_deg'], '.2f')} deg")
    else:
        parts.append("no ground truth: poses only")
    parts.append(f"{report['n_localized']}/{report['n_frames']} localized")
    parts.append(f"latency p50 {_fmt(report['latency_p50_ms'], '.0f')} ms, p90 {_fmt(report['latency_p90_ms'], '.0f')}"
                 f" ms, {_fmt(report['throughput_fps'], '.2f')} frames/s")
    return "; ".join(parts)


def markdown(report: dict, plots: dict[str, Path] | None = None, title: str = "aceg-replay") -> str:
    """The Markdown summary of one replay; ``plots`` are linked relative to the report folder."""
    rows = [("frames replayed", report["n_frames"]), ("frames with a pose", report["n_localized"]),
            ("frames with ground truth", report["n_frames"] - report["n_without_gt"])]
    if report["has_ground_truth"]:
        rows += [("within 5 cm / 5 deg", _fmt(report["pct_5cm_5deg"], ".1f", " %")),
                 ("within 10 cm / 10 deg", _fmt(report["pct_10cm_10deg"], ".1f", " %")),
                 ("median translation error", _fmt(report["median_trans_cm"], ".2f", " cm")),
                 ("median rotation error", _fmt(report["median_rot_deg"], ".2f", " deg")),
                 ("failed (no pose, counted as wrong)", report["n_failed"]),
                 ("position errors within the covariance's 95 % bound",
                  _fmt(report.get("pct_nees_trans_within_95"), ".1f", " %"))]
    rows += [("latency p50 / p90 / p99", f"{_fmt(report['latency_p50_ms'], '.0f')} / "
              f"{_fmt(report['latency_p90_ms'], '.0f')} / {_fmt(report['latency_p99_ms'], '.0f')} ms"),
             ("throughput", _fmt(report["throughput_fps"], ".2f", " frames/s")),
             ("wall time", _fmt(report["wall_s"], ".1f", " s"))]
    lines = [f"# {title}", ""]
    for key in ("mode", "rate", "bag", "map", "model", "gt_source", "latency_measures", "clock"):
        if report.get(key) not in (None, ""):
            lines.append(f"- **{key}**: {report[key]}")
    for note in report.get("notes") or []:
        lines.append(f"- note: {note}")
    if report.get("params"):
        lines.append("- **node parameters**: " + ", ".join(f"{k}={v}" for k, v in report["params"].items()))
    lines += ["", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if not report["has_ground_truth"]:
        lines += ["", "The bag has no ground-truth poses: the poses are reported without accuracy."]
    if plots:
        lines += [""]
        for name, path in plots.items():
            lines += [f"![{name}]({Path(path).name})", ""]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _up_axis(poses: list[np.ndarray]) -> np.ndarray:
    """The world 'up' direction: cameras are held upright, so their optical -y axes average to it."""
    up = -np.mean([T[:3, 1] for T in poses], axis=0)
    n = np.linalg.norm(up)
    return up / n if n > 1e-6 else np.array([0.0, 0.0, 1.0])


def top_down_axes(poses: list[np.ndarray]) -> tuple[np.ndarray, tuple[str, str]]:
    """A 2x3 projection onto the ground plane and its axis labels.

    When 'up' is within 25 deg of a world axis, the other two world axes are
    used (labels x/y/z); otherwise the plane's principal directions.
    """
    up = _up_axis(poses)
    k = int(np.argmax(np.abs(up)))
    if abs(up[k]) > math.cos(math.radians(25)):
        a, b = [i for i in range(3) if i != k]
        P = np.zeros((2, 3))
        P[0, a] = P[1, b] = 1.0
        if k == 1:  # y up (or down): keep a right-handed top-down view, x right, z down the page
            P[1, b] = -np.sign(up[k])
        return P, (f"map {'xyz'[a]} (m)", f"map {'xyz'[b]} (m)")
    pts = np.array([T[:3, 3] for T in poses])
    flat = pts - pts.mean(0)
    flat -= np.outer(flat @ up, up)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    e1 = vt[0] - (vt[0] @ up) * up
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(up, e1)]), ("horizontal axis 1 (m)", "horizontal axis 2 (m)")


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (0.1, 1, 10), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _errors(frames: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time s since the first frame, translation error cm, rotation error deg); NaN without an error."""
    t0 = frames[0]["stamp"] if frames else 0.0
    t = np.array([f["stamp"] - t0 for f in frames])
    te = np.array([np.nan if f["trans_err_cm"] is None else f["trans_err_cm"] for f in frames])
    re = np.array([np.nan if f["rot_err_deg"] is None else f["rot_err_deg"] for f in frames])
    return t, te, re


def plot_trajectory(report: dict, path: Path, title: str = "", mapping_xyz: np.ndarray | None = None) -> Path:
    """Top-down view: ground truth (grey) vs estimates coloured by translation error; failures as red x.

    ``mapping_xyz`` (N x 3, map frame, optional): the mapping cameras' positions.
    With it the figure has two panels: an overview of the whole mapped area and
    the queries, and the queries in detail.
    """
    plt = _pyplot()
    frames = report["frames"]
    gt = [_matrix(f["gt_pose"]) for f in frames]
    est = [_matrix(f["pose"]) for f in frames]
    ref = [T for T in gt if T is not None] or [T for T in est if T is not None]
    mapping = mapping_xyz is not None and len(mapping_xyz) > 0
    if mapping:
        fig, (ax_all, ax) = plt.subplots(1, 2, figsize=(13.5, 6.3), gridspec_kw={"width_ratios": [1.0, 1.25]})
    else:
        fig, ax = plt.subplots(figsize=(7.5, 6.5))
    if not ref:
        ax.text(0.5, 0.5, "no poses and no ground truth", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    P, labels = top_down_axes(ref)
    mp = np.asarray(mapping_xyz, dtype=np.float64) @ P.T if mapping else None
    g = np.array([P @ T[:3, 3] for T in gt if T is not None]).reshape(-1, 2)
    sc, off = _draw_trajectory(ax, report, P, gt, est, mp, box_from=g if len(g) else None)
    if sc is not None:
        _colorbar(fig, ax, sc, report)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    note = f"\n{off} estimates outside the view are drawn at its border" if off else ""
    ax.set_title(("queries in detail" if mapping else "top-down trajectory") + note, fontsize=9)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    if mapping:
        seen = np.vstack([mp, g]) if len(g) else mp
        _draw_trajectory(ax_all, report, P, gt, est, mp, box_from=seen, lines=False)
        ax_all.set_xlabel(labels[0])
        ax_all.set_ylabel(labels[1])
        ax_all.set_title("overview: the mapped area and the queries", fontsize=9)
    fig.suptitle((title + ": " if title else "") + _short(report), fontsize=10)
    return _save(fig, path)


def _draw_trajectory(ax, report: dict, P: np.ndarray, gt: list, est: list, mapping_2d: np.ndarray | None,
                     box_from: np.ndarray | None, lines: bool = True):
    """One top-down panel; returns (the estimates' scatter or None, estimates clipped to the view)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    import matplotlib.pyplot as plt

    def xy(T):
        return P @ T[:3, 3]

    if mapping_2d is not None:
        ax.plot(mapping_2d[:, 0], mapping_2d[:, 1], ".", color="tab:blue", alpha=0.35, ms=4, zorder=0,
                label="mapping cameras (where the map was made)")
    box_lo = box_hi = None
    if box_from is not None:
        # A square view around what matters, so a long thin path still fills the panel.
        lo, hi = box_from.min(0), box_from.max(0)
        half = 0.5 * float((hi - lo).max()) * 1.15 + 0.5
        box_lo, box_hi = (lo + hi) / 2 - half, (lo + hi) / 2 + half
    if any(T is not None for T in gt):
        g = np.array([xy(T) for T in gt if T is not None])
        ax.plot(g[:, 0], g[:, 1], "-", color="0.45", lw=1.5, zorder=1, label="ground truth (queries)")
        ax.plot(g[0, 0], g[0, 1], "o", ms=9, mfc="none", mec="0.2", zorder=2, label="start")
    # Each estimate: a dot coloured by its translation error, a thin line to its ground truth.
    pts, errs, off = [], [], 0
    for f, Tg, Te in zip(report["frames"], gt, est):
        if Te is None:
            continue
        p = xy(Te)
        if box_lo is not None:
            clipped = np.clip(p, box_lo, box_hi)
            off += int(np.any(clipped != p))
            p = clipped
        if lines and Tg is not None:
            q = xy(Tg)
            ax.plot([q[0], p[0]], [q[1], p[1]], "-", color="0.7", lw=0.6, zorder=1)
        pts.append(p)
        errs.append(f["trans_err_cm"])
    sc = None
    if pts:
        pts = np.array(pts)
        if report["has_ground_truth"] and all(e is not None for e in errs):
            # Discrete bins of translation error, green (good) to dark red (lost).
            n_bins = len(ERROR_BINS_CM) - 1
            cmap = ListedColormap(plt.get_cmap("RdYlGn_r")(np.linspace(0.0, 1.0, n_bins)))
            level = np.searchsorted(ERROR_BINS_CM, np.array(errs, dtype=float), side="right") - 1
            sc = ax.scatter(pts[:, 0], pts[:, 1], c=np.clip(level, 0, n_bins - 1) + 0.5, cmap=cmap,
                            norm=BoundaryNorm(np.arange(n_bins + 1), n_bins), s=30 if lines else 16,
                            edgecolors="k", linewidths=0.4, zorder=3, clip_on=False,
                            label="estimate (colour = translation error)")
        else:
            sc = ax.scatter(pts[:, 0], pts[:, 1], c=np.arange(len(pts)), cmap="viridis", s=28 if lines else 14,
                            zorder=3, clip_on=False, label="estimate (colour = frame order)")
    failed = [xy(Tg) for Tg, Te in zip(gt, est) if Te is None and Tg is not None]
    if failed:
        fa = np.array(failed)
        ax.scatter(fa[:, 0], fa[:, 1], marker="x", color="red", s=40 if lines else 20, lw=1.5, zorder=4,
                   label=f"no pose ({len(failed)} frames, at ground truth)")
    if box_lo is not None:
        ax.set_xlim(box_lo[0], box_hi[0])
        ax.set_ylim(box_lo[1], box_hi[1])
    ax.set_aspect("equal", adjustable="box")
    ax.grid(alpha=0.3)
    return sc, off


def _colorbar(fig, ax, sc, report: dict) -> None:
    if report["has_ground_truth"] and sc.get_cmap().name != "viridis":
        n_bins = len(ERROR_BINS_CM) - 1
        cb = fig.colorbar(sc, ax=ax, shrink=0.8, ticks=np.arange(n_bins + 1))
        cb.set_ticklabels([f"{b:g}" for b in ERROR_BINS_CM[:-1]] + ["∞"])
        cb.set_label("translation error (cm)")
    else:
        fig.colorbar(sc, ax=ax, shrink=0.8).set_label("frame index")


def _short(report: dict) -> str:
    if not report["has_ground_truth"]:
        return f"{report['n_localized']}/{report['n_frames']} localized (no ground truth)"
    return (f"{_fmt(report['pct_5cm_5deg'], '.0f', '%')} within 5cm/5°, "
            f"{_fmt(report['pct_10cm_10deg'], '.0f', '%')} within 10cm/10°, "
            f"{report['n_failed']} of {report['n_query']} without pose")


def plot_errors_over_time(report: dict, path: Path, title: str = "") -> Path:
    """Translation error, rotation error and latency against bag time; failures marked in red."""
    plt = _pyplot()
    frames = report["frames"]
    t, te, re = _errors(frames)
    lat = np.array([np.nan if f["latency_ms"] is None else f["latency_ms"] for f in frames])
    failed = np.array([f["pose"] is None for f in frames], dtype=bool)
    has_gt = report["has_ground_truth"]
    n = 3 if has_gt else 1
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n + 0.8), sharex=True, squeeze=False)
    axes = axes[:, 0]
    if has_gt:
        for ax, err, unit, floor in ((axes[0], te, "cm", ERROR_FLOOR[0]), (axes[1], re, "deg", ERROR_FLOOR[1])):
            ok = np.isfinite(err)
            # NaN (no pose) breaks the line: a gap, never a line through frames without a pose.
            ax.semilogy(t, np.maximum(err, floor), ".-", color="tab:blue", ms=5, lw=0.8, label="error")
            for thr, style in ((5, "--"), (10, ":")):
                ax.axhline(thr, color="k", ls=style, lw=0.8, label=f"{thr} {unit}")
            if not ok.any():
                ax.set_ylim(0.1, 100.0)
            if failed.any():
                top = ax.get_ylim()[1]
                ax.plot(t[failed], np.full(failed.sum(), top), "x", color="red", ms=7, mew=1.5, clip_on=False,
                        label="no pose")
            _plain_log_ticks(ax.yaxis)
            ax.set_ylabel(f"{'translation' if unit == 'cm' else 'rotation'}\nerror ({unit})")
            ax.grid(alpha=0.3, which="both")
            ax.legend(loc="upper right", fontsize=7, ncol=4)
    ax = axes[-1]
    ax.plot(t, lat, ".-", color="tab:purple", ms=4, lw=0.8, label="latency (frames with a pose)")
    if report.get("latency_p50_ms") is not None:
        ax.axhline(report["latency_p50_ms"], color="k", ls="--", lw=0.8,
                   label=f"median {report['latency_p50_ms']:.0f} ms")
    if failed.any() and not has_gt:
        ax.plot(t[failed], np.zeros(failed.sum()), "x", color="red", ms=6, label="no pose")
    if not np.isfinite(lat).any():
        ax.text(0.5, 0.5, "no frame got a pose: no latency to show", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7, ncol=3)
    ax.set_xlabel("bag time since the first image (s)")
    axes[0].set_title((title + "\n" if title else "") + "error and latency over time: " + _short(report), fontsize=9)
    return _save(fig, path)


def _cdf(values: np.ndarray, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the fraction of *all* frames at or below each (failures never count)."""
    v = np.sort(values[np.isfinite(values)])
    return v, np.arange(1, len(v) + 1) / max(n_total, 1)


def plot_error_cdf(reports: dict[str, dict], path: Path, title: str = "") -> Path:
    """Fraction of frames within a translation / rotation error, one curve per report.

    Frames without a pose never count as within any error, so a curve tops out
    at the fraction localized.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x_min: dict = {}
    x_max: dict = {}
    for i, (name, rep) in enumerate(reports.items()):
        frames = [f for f in rep["frames"] if f["gt_pose"] is not None]
        _, te, re = _errors(frames)
        for ax, err, floor in ((axes[0], te, ERROR_FLOOR[0]), (axes[1], re, ERROR_FLOOR[1])):
            v, frac = _cdf(np.maximum(err, floor), len(frames))
            label = (f"{name}: {_fmt(rep.get('pct_5cm_5deg'), '.0f', '%')} within 5 cm and 5°, "
                     f"{rep.get('n_failed')} of {len(frames)} without pose")
            if len(v):
                # Extended far right: the plateau is the fraction localized (applied with the x limits below).
                ax.step(np.r_[v[0], v, 1e6], np.r_[0.0, frac, frac[-1]] * 100, where="post",
                        color=colours[i % len(colours)], lw=1.6, label=label)
                x_max[ax] = max(x_max.get(ax, 0.0), float(v[-1]))
                x_min[ax] = min(x_min.get(ax, 1e6), float(v[0]))
            else:
                ax.plot([], [], color=colours[i % len(colours)], label=label + " (no pose at all)")
    for ax, unit in ((axes[0], "cm"), (axes[1], "deg")):
        ax.set_xscale("log")
        lo, hi = min(x_min.get(ax, 1.0), 1.0), max(x_max.get(ax, 20.0), 20.0)
        ax.set_xlim(lo / 1.5, hi * 1.5)
        for thr, style in ((5, "--"), (10, ":")):
            ax.axvline(thr, color="k", ls=style, lw=0.8)
            ax.text(thr, 101, f"{thr} {unit}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 100)
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel(f"{'translation' if unit == 'cm' else 'rotation'} error ({unit}, log scale)")
        ax.set_ylabel("frames with error ≤ x (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle((title + ": " if title else "") + "share of frames within an error; frames without a pose "
                 "never count, so a curve levels off at the share localized", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --- files -----------------------------------------------------------------------------------


def write_json(report: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=False))
    return path


def write_report(report: dict, report_dir: Path, title: str = "aceg-replay",
                 mapping_xyz: np.ndarray | None = None) -> dict[str, Path]:
    """The Markdown summary and the PNG plots of one replay in ``report_dir``; returns their paths.

    Without ground truth only the trajectory (estimates coloured by frame order)
    and the latency plot are drawn; there is no error to plot. ``mapping_xyz``:
    see :func:`plot_trajectory`.
    """
    report_dir = Path(report_dir)
    plots = {"trajectory": plot_trajectory(report, report_dir / "trajectory.png", title, mapping_xyz),
             "error_over_time": plot_errors_over_time(report, report_dir / "error_over_time.png", title)}
    if report["has_ground_truth"]:
        plots["error_cdf"] = plot_error_cdf({title: report}, report_dir / "error_cdf.png", title)
    md = report_dir / "report.md"
    md.write_text(markdown(report, plots, title))
    return {"markdown": md, **plots}


def main(argv: list[str] | None = None) -> int:
    """Rebuild the Markdown and plots from a replay JSON: ``python -m aceg_ros.report replay.json --out DIR``."""
    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("json", type=Path, help="a JSON written by aceg-replay")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: beside the JSON)")
    p.add_argument("--title", default="aceg-replay", help="title of the report and plots")
    args = p.parse_args(argv)
    try:
        report = json.loads(args.json.read_text())
        paths = write_report(report, args.out or args.json.parent, args.title)
    except (OSError, ValueError, KeyError) as e:
        print(f"aceg_ros.report: {e}", file=sys.stderr)
        return 2
    print(one_line(report))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
