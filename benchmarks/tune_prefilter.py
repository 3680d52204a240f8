"""The PnP prefilter size (and inlier threshold) against accuracy and RANSAC time, to set
``PnPConfig.top_k`` and ``threshold_px``.

Regresses every query image once against its map, then solves the pose
from the ``top_k`` most certain correspondences for each ``--top-k`` value
and each ``--threshold-px``, so every setting sees exactly the same
correspondences. Query images are
resized to ``--size`` first (the pixel threshold of RANSAC is in image
pixels). Generated rooms are the intended input, never the held-out 7-Scenes
kitchen (see ``wrong_map_inliers.py`` for how to make them and their maps):

    python benchmarks/tune_prefilter.py runs/room900001 runs/room900001/aceg.map \\
        runs/room900003 runs/room900003/aceg.map --top-k 200 400 600 800 2000
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from _common import finish_run, resize_frame_image, run_header, summarize_ms

from aceg_model.datasets import open_dataset
from aceg_model.evaluate import DEFAULT_MODEL
from aceg_model.geometry import pose_error
from aceg_model.localizer import Localizer
from aceg_model.mapping import SceneMap
from aceg_model.metrics import accuracy_summary
from aceg_model.model import AcegModel
from aceg_model.pnp import PnPConfig, solve_pnp

NAME = "tune_prefilter"


def regress_queries(folder: Path, map_file: Path, query_list: str, model: AcegModel,
                    size: tuple[int, int]) -> list[tuple]:
    """(scene coordinates, uncertainties, pixels, intrinsics, ground-truth pose) per query image."""
    queries = open_dataset(folder, "auto", folder / query_list)
    localizer = Localizer(model, SceneMap.load(map_file, model))
    out = []
    for i in tqdm(range(len(queries)), desc=f"regress {folder.name}", unit="img"):
        frame = queries[i]
        image, K = resize_frame_image(frame.image, frame.intrinsics, *size)
        coords, log_sigma, pixels, _, _ = localizer.regress(image, K)
        out.append((coords, np.exp(log_sigma), pixels, K, frame.T_world_cam))
    return out


def evaluate_config(regressed: list[tuple], config: PnPConfig) -> dict:
    """Accuracy, RANSAC time and inlier counts of one PnP setting over all regressed queries."""
    t_err, r_err, ransac_ms, inliers = [], [], [], []
    for coords, sigma, pixels, K, T_gt in regressed:
        res = solve_pnp(coords, pixels, K, config, uncertainty_N=sigma)
        ransac_ms.append(res.timings_ms.get("ransac", float("nan")))  # absent: too few to try
        inliers.append(res.n_inliers)
        if res.success:
            t, r = pose_error(res.T_world_cam, T_gt)
            t_err.append(t), r_err.append(r)
        else:
            t_err.append(None), r_err.append(None)
    return {"top_k": config.top_k, "threshold_px": config.threshold_px, "accuracy": accuracy_summary(t_err, r_err),
            "ransac_ms": summarize_ms([v for v in ransac_ms if np.isfinite(v)]),
            "inliers_median": float(np.median(inliers))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pairs", nargs="+", help="QUERY_FOLDER MAP_FILE [QUERY_FOLDER MAP_FILE ...]")
    p.add_argument("--query-list", default="query-lighting.txt", help="query list file inside each folder")
    p.add_argument("--top-k", type=int, nargs="+", default=[200, 400, 600, 800, 1000, 2000],
                   help="prefilter sizes to compare")
    p.add_argument("--threshold-px", type=float, nargs="+", default=[PnPConfig.threshold_px],
                   help="RANSAC inlier thresholds to compare (px at --size)")
    p.add_argument("--repeats", type=int, default=3,
                   help="solve every setting this many times (RANSAC times are the median of the repeats' means)")
    p.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"),
                   help="query images are resized to this size before regression")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pre-trained model (safetensors)")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / f"{NAME}.json",
                   help="output JSON")
    args = p.parse_args(argv)
    if len(args.pairs) % 2:
        p.error("give query folders and map files in pairs")
    if min(args.top_k) < 4 or min(args.threshold_px) <= 0 or args.repeats < 1:
        p.error("need --top-k values >= 4, --threshold-px values > 0 and --repeats >= 1")
    model = AcegModel.load(args.model)
    out = run_header(NAME, args, model.device)
    try:
        regressed = [r for folder, map_file in zip(args.pairs[::2], args.pairs[1::2])
                     for r in regress_queries(Path(folder), Path(map_file), args.query_list, model, tuple(args.size))]
    except (ValueError, FileNotFoundError) as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 2
    out["n_query"] = len(regressed)
    out["settings"] = []
    for top_k in args.top_k:
        for threshold in args.threshold_px:
            config = replace(PnPConfig(), top_k=top_k, threshold_px=threshold)
            runs = [evaluate_config(regressed, config) for _ in range(args.repeats)]
            best = sorted(runs, key=lambda r: r["ransac_ms"]["mean"])[len(runs) // 2]  # median repeat by time
            out["settings"].append(best)
            acc = best["accuracy"]
            print(f"top_k {top_k:5d}, {threshold:4.1f} px: {acc['pct_5cm_5deg']:5.1f} % / {acc['pct_10cm_10deg']:5.1f} %, "
                  f"{acc['n_failed']} no pose, median {acc['median_trans_cm']:.2f} cm, RANSAC "
                  f"{best['ransac_ms']['mean']:.1f} ms mean ({best['ransac_ms']['p95']:.1f} p95), "
                  f"{best['inliers_median']:.0f} inliers")
    return finish_run(args.json, out)


if __name__ == "__main__":
    raise SystemExit(main())
