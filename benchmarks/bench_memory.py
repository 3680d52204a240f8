"""Localization memory over a long run: host RSS (and CUDA memory) every N frames for 10,000 frames.

A robot localizes for hours, so per-frame memory must not grow. This maps
the scene once per method (or loads ``--map``), decodes a fixed set of query
images, then localizes them round-robin for ``--frames`` frames and samples
the memory every ``--every`` frames. It reports the growth after the warm-up
samples and the slope of a line fitted to them (bytes per 1000 frames).

    python benchmarks/bench_memory.py --focal 525 --frames 10000 --methods aceg \\
        --map runs/full/aceg.map.safetensors
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from _common import (add_common_args, current_rss_bytes, evenly_spaced, finish_run, mapping_config,
                     start_run, write_json)

from aceg_model.localizer import Localizer
from aceg_model.mapping import SceneMap, map_scene

NAME = "bench_memory"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    p.add_argument("--frames", type=int, default=10_000, help="localizations per method")
    p.add_argument("--images", type=int, default=50, help="distinct query images, evenly spaced, localized in turn")
    p.add_argument("--every", type=int, default=250, help="memory sample period [frames]")
    p.add_argument("--warmup-samples", type=int, default=2,
                   help="samples left out of the growth figures (allocator and caches settle first)")
    p.add_argument("--mapping-frames", type=int, default=100, help="mapping frames when mapping here")
    p.add_argument("--iterations", type=int, default=100, help="mapping iterations when mapping here")
    p.add_argument("--map", type=Path, default=None, help="use this map file instead of mapping (one method)")
    args = p.parse_args(argv)
    if args.frames < 1 or args.images < 1 or args.every < 1 or args.warmup_samples < 0:
        p.error("--frames, --images and --every must be >= 1, --warmup-samples >= 0")
    if args.frames // args.every < args.warmup_samples + 2:
        p.error("need at least two samples after the warm-up: raise --frames or lower --every")
    return args


def growth_figures(frames: list[int], rss: list[int], warmup: int) -> dict:
    """Growth of RSS after the warm-up samples: last minus first, max minus first, fitted slope."""
    f, r = np.asarray(frames[warmup:], np.float64), np.asarray(rss[warmup:], np.float64)
    slope = float(np.polyfit(f, r, 1)[0]) if len(f) >= 2 else float("nan")
    return {"from_frame": int(f[0]), "to_frame": int(f[-1]),
            "rss_growth_bytes": int(r[-1] - r[0]), "rss_max_above_first_bytes": int(r.max() - r[0]),
            "rss_slope_bytes_per_1000_frames": 1000.0 * slope}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run(NAME, args)
    if run is None:
        return 2
    device, model, mapping_ds, query_ds, json_path, out = run
    try:
        loaded = SceneMap.load(args.map, model) if args.map else None
    except (ValueError, FileNotFoundError) as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 2
    methods = [loaded.method] if loaded else args.methods
    images = [(query_ds[i].image, query_ds[i].intrinsics) for i in evenly_spaced(len(query_ds), args.images)]
    out["data"] = {"path": str(args.data), "n_query_images": len(images), "map": str(args.map) if args.map else None}
    out["methods"] = {}
    for method in methods:
        if loaded:
            scene_map = loaded
        else:
            frames = [mapping_ds[i] for i in evenly_spaced(len(mapping_ds), args.mapping_frames)]
            scene_map, _ = map_scene(model, frames, mapping_config(args, method, args.iterations))
        localizer = Localizer(model, scene_map)
        gc.collect()
        samples = {"frame": [], "rss_bytes": [], "cuda_allocated_bytes": [], "seconds": []}
        n_ok, t0 = 0, time.perf_counter()
        for k in tqdm(range(1, args.frames + 1), desc=f"localize ({method})", unit="frame"):
            image, intrinsics = images[(k - 1) % len(images)]
            n_ok += localizer.localize(image, intrinsics).success
            if k % args.every == 0:
                samples["frame"].append(k)
                samples["rss_bytes"].append(current_rss_bytes())
                samples["cuda_allocated_bytes"].append(
                    torch.cuda.memory_allocated(device) if device.type == "cuda" else None)
                samples["seconds"].append(time.perf_counter() - t0)
        out["methods"][method] = {
            "frames": args.frames, "success_rate": n_ok / args.frames,
            "ms_per_frame_mean": 1e3 * (time.perf_counter() - t0) / args.frames,
            "growth": growth_figures(samples["frame"], samples["rss_bytes"], args.warmup_samples),
            "samples": samples,
        }
        write_json(json_path, out)
        g = out["methods"][method]["growth"]
        print(f"{method}: {args.frames} frames, RSS {samples['rss_bytes'][-1] / 2**20:.0f} MiB at the end, "
              f"growth {g['rss_growth_bytes'] / 2**10:+.0f} KiB from frame {g['from_frame']} "
              f"(max {g['rss_max_above_first_bytes'] / 2**10:.0f} KiB above, "
              f"slope {g['rss_slope_bytes_per_1000_frames'] / 2**10:+.1f} KiB per 1000 frames)")
    return finish_run(json_path, out)


if __name__ == "__main__":
    raise SystemExit(main())
