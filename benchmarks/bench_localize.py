"""Per-frame localization latency and memory, ACE-G map codes vs the ACE-style MLP head.

Maps one scene once per method (same frames, iterations and seed), then
localizes the same query images with each map and reports per-stage times
(encoder, regressor, PnP prefilter / RANSAC / covariance, total), success
rate, host RSS, CUDA peak memory and map file size, with aceg/ace ratios.
The encoder is shared, so its time should match between methods; the
regressor and PnP stages are where the methods differ.

    python benchmarks/bench_localize.py --frames 200 --mapping-frames 100 --iterations 600
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from _common import (MemoryProbe, add_common_args, evenly_spaced, mapping_config, now,
                     ratios, resize_frame_image, start_run, summarize_ms, write_json)

from aceg_model.frames import Frame
from aceg_model.geometry import pose_error
from aceg_model.localizer import Localizer
from aceg_model.mapping import MIN_MAPPING_FRAMES, MappingConfig, SceneMap, map_scene, progress_bar
from aceg_model.metrics import accuracy_summary
from aceg_model.model import AcegModel

NAME = "bench_localize"
# Localizer timing keys -> the stage names reported here.
STAGES = {"undistort": "undistort", "encoder": "encoder", "regressor": "regressor", "refine_pixels": "refine_pixels",
          "pnp_prefilter": "prefilter", "pnp_ransac": "ransac", "pnp_covariance": "covariance",
          "visit": "visit", "photometric": "photometric", "seed_rays": "seed_rays", "total": "total"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    p.add_argument("--mapping-frames", type=int, default=100,
                   help="mapping frames, evenly spaced over the mapping split")
    p.add_argument("--iterations", type=int, default=600, help="mapping iterations per method")
    p.add_argument("--frames", type=int, default=200,
                   help="timed query frames, evenly spaced over the query split (cycled if the split is shorter)")
    p.add_argument("--warmup", type=int, default=10, help="untimed localizations before the timed ones, per method")
    p.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"),
                   help="query images are resized to this size in px before localizing (redkitchen is 640x480)")
    args = p.parse_args(argv)
    if args.mapping_frames < MIN_MAPPING_FRAMES or args.iterations < 1 or args.frames < 1 or args.warmup < 0:
        p.error(f"need --mapping-frames >= {MIN_MAPPING_FRAMES}, --iterations and --frames >= 1, --warmup >= 0")
    return args


def query_indices(n_total: int, n: int) -> list[int]:
    """``n`` query indices: evenly spaced, or the whole split repeated when it has fewer frames."""
    if n <= n_total:
        return evenly_spaced(n_total, n)
    return [i % n_total for i in range(n)]


def warm_up_mapping(model: AcegModel, frames: list[Frame], methods: list[str]) -> None:
    """A tiny untimed mapping per method: the first torch calls of a process pay one-off set-up
    (seconds on CPU) that would otherwise land on whichever method is mapped first."""
    for method in methods:
        map_scene(model, frames[:MIN_MAPPING_FRAMES], MappingConfig(method=method, iterations=2, batch_patches=256))


def map_method(model: AcegModel, frames: list[Frame], method: str, args: argparse.Namespace,
               map_dir: Path) -> tuple[SceneMap, dict]:
    """Map ``frames`` with ``method``; the report, its memory and the saved map's size in bytes."""
    cfg = mapping_config(args, method, args.iterations)
    torch.manual_seed(args.seed)
    progress, bar = progress_bar(args.iterations, f"mapping ({method})")
    with MemoryProbe(model.device) as mem:
        t0 = time.perf_counter()
        scene_map, report = map_scene(model, frames, cfg, progress)
        wall = time.perf_counter() - t0
    bar.close()
    path = map_dir / f"{method}.safetensors"
    scene_map.save(path)
    return scene_map, {"report": asdict(report), "wall_seconds": wall, "memory": mem.result,
                       "map_bytes": path.stat().st_size}


def time_localization(localizer: Localizer, queries: list[Frame], warmup: int, desc: str) -> dict:
    """Localize ``warmup`` frames untimed, then every query; per-stage times, success, accuracy, memory."""
    # Warm-up: first-call allocations, thread pools and (on CUDA) kernel selection stay out of the numbers.
    for i in range(warmup):
        frame = queries[i % len(queries)]
        localizer.localize(frame.image, frame.intrinsics)

    stage_ms: dict[str, list[float]] = {name: [] for name in [*STAGES.values(), "wall"]}
    t_err: list[float | None] = []
    r_err: list[float | None] = []
    with MemoryProbe(localizer.device) as mem:
        for frame in tqdm(queries, desc=desc, unit="frame", leave=False):
            t0 = time.perf_counter()
            res = localizer.localize(frame.image, frame.intrinsics)
            # Wall time also counts what the stage timers leave out (device->host copy, pixel mapping).
            stage_ms["wall"].append(1e3 * (time.perf_counter() - t0))
            # A refused frame has no RANSAC (too few correspondences) or covariance stage: those
            # stages are summarized over the frames that reached them (their "n").
            for key, name in STAGES.items():
                if key in res.timings_ms:
                    stage_ms[name].append(res.timings_ms[key])
            if res.success:
                dt, dr = pose_error(res.T_world_cam, frame.T_world_cam)
                t_err.append(dt), r_err.append(dr)
            else:
                t_err.append(None), r_err.append(None)
    n_ok = sum(t is not None for t in t_err)
    return {"n_frames": len(queries), "n_warmup": warmup, "n_success": n_ok, "success_rate": n_ok / len(queries),
            "stage_ms": {name: summarize_ms(v) for name, v in stage_ms.items()},
            "accuracy": accuracy_summary(t_err, r_err), "memory": mem.result}


def headline(result: dict) -> dict:
    """The figures compared between methods (a flat-ish dict; ratios are taken key by key)."""
    loc, mapping = result["localization"], result["mapping"]
    figures = {f"{stage}_ms": {"mean": s["mean"], "p95": s["p95"]} for stage, s in loc["stage_ms"].items()}
    figures.update(
        success_rate=loc["success_rate"],
        pct_5cm_5deg=loc["accuracy"]["pct_5cm_5deg"],
        localize_peak_rss_bytes=loc["memory"]["peak_rss_bytes"],
        localize_rss_growth_bytes=loc["memory"]["rss_growth_bytes"],
        mapping_peak_rss_bytes=mapping["memory"]["peak_rss_bytes"],
        mapping_seconds=sum(mapping["report"][k] for k in ("seconds_encode", "seconds_seed", "seconds_optimize")),
        map_bytes=mapping["map_bytes"],
    )
    if "cuda_peak_bytes" in loc["memory"]:
        figures.update(localize_cuda_peak_bytes=loc["memory"]["cuda_peak_bytes"],
                       mapping_cuda_peak_bytes=mapping["memory"]["cuda_peak_bytes"])
    return figures


def print_table(out: dict) -> None:
    methods = list(out["methods"])
    cols = methods + (["aceg/ace"] if "ratio_aceg_over_ace" in out else [])
    print(f"{'figure':28s}" + "".join(f"{c:>14s}" for c in cols))
    for key in out["methods"][methods[0]]["figures"]:
        for sub in ("mean", "p95") if key.endswith("_ms") else (None,):
            label = f"{key} {sub}" if sub else key

            def cell(fig: dict) -> str:
                v = fig[key][sub] if sub else fig[key]
                return f"{v:14.3f}" if isinstance(v, float) else f"{'-' if v is None else v:>14}"

            row = [cell(out["methods"][m]["figures"]) for m in methods]
            if "ratio_aceg_over_ace" in out:
                r = out["ratio_aceg_over_ace"].get(f"{key}.{sub}" if sub else key)
                row.append(f"{r:14.3f}" if r is not None else f"{'-':>14}")
            print(f"{label:28s}" + "".join(row))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = start_run(NAME, args)
    if started is None:
        return 2
    device, model, mapping_ds, query_ds, json_path, out = started

    # Frames are decoded once up front so disk and JPEG decoding stay out of every timing.
    map_idx = evenly_spaced(len(mapping_ds), args.mapping_frames)
    mapping = [mapping_ds[i] for i in map_idx]
    queries = []
    for i in query_indices(len(query_ds), args.frames):
        f = query_ds[i]
        image, K = resize_frame_image(f.image, f.intrinsics, *args.size)
        queries.append(Frame(image, K, f.T_world_cam, name=f.name))
    out["data"] = {"path": str(args.data), "n_mapping_split": len(mapping_ds), "n_query_split": len(query_ds),
                   "mapping_frames": [mapping_ds.names[i] for i in map_idx],
                   "mapping_image_size": list(mapping[0].image.shape[1::-1]),
                   "query_image_size": list(args.size), "n_query_distinct": len({q.name for q in queries})}
    out["methods"] = {}

    warm_up_mapping(model, mapping, args.methods)
    with tempfile.TemporaryDirectory(prefix="bench_localize_") as map_dir:
        for method in args.methods:
            scene_map, mapping_result = map_method(model, mapping, method, args, Path(map_dir))
            gc.collect()  # the feature cache of mapping is garbage now; keep it out of localization's RSS
            result = {"mapping": mapping_result,
                      "localization": time_localization(Localizer(model, scene_map), queries, args.warmup,
                                                        f"localize ({method})")}
            result["figures"] = headline(result)
            out["methods"][method] = result
            del scene_map
            gc.collect()
            write_json(json_path, out)  # a killed run keeps the methods that finished

    if "aceg" in out["methods"] and "ace" in out["methods"]:
        out["ratio_aceg_over_ace"] = ratios(out["methods"]["aceg"]["figures"], out["methods"]["ace"]["figures"])
    out["finished_at"] = now()
    write_json(json_path, out)
    print_table(out)
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
