"""Mapping time and final accuracy vs number of mapping frames and iterations, ACE-G vs ACE-style head.

For every (frames, iterations) pair and every method: map an evenly spaced
subset of the mapping split, save the map, localize evenly spaced query
frames, and record mapping seconds, accuracy, peak RSS growth and map size.
The JSON is rewritten after every run, so a killed benchmark keeps what
finished; ``finished_at`` stays null in that case.

    python benchmarks/bench_mapping.py --focal 525 --frames 50 100 250 500 --iterations 300 600
"""
from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from _common import (MemoryProbe, add_common_args, evenly_spaced, finish_run, mapping_config, now,
                     ratios, start_run, write_json)

from aceg_model.evaluate import evaluate_queries
from aceg_model.frames import Frame
from aceg_model.localizer import Localizer
from aceg_model.mapping import MIN_MAPPING_FRAMES, MappingConfig, map_scene, progress_bar
from aceg_model.model import AcegModel

NAME = "bench_mapping"
ACCURACY_KEYS = ("pct_5cm_5deg", "pct_10cm_10deg", "median_trans_cm", "median_rot_deg", "n_failed", "n_query",
                 "localize_ms_mean")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    p.add_argument("--frames", type=int, nargs="+", default=[50, 100, 250, 500],
                   help="numbers of mapping frames, each an evenly spaced subset of the mapping split")
    p.add_argument("--iterations", type=int, nargs="+", default=[300, 600], help="mapping iteration budgets")
    p.add_argument("--queries", type=int, default=50, help="query frames localized per run, evenly spaced")
    args = p.parse_args(argv)
    if min(args.frames) < MIN_MAPPING_FRAMES or min(args.iterations) < 1 or args.queries < 1:
        p.error(f"need --frames >= {MIN_MAPPING_FRAMES}, --iterations >= 1 and --queries >= 1")
    return args


class FrameCache:
    """Mapping frames decoded once and shared by every run that uses them (decoding stays out of the timings)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.frames: dict[int, Frame] = {}

    def subset(self, n: int) -> tuple[list[int], list[Frame]]:
        idx = evenly_spaced(len(self.dataset), n)
        for i in idx:
            if i not in self.frames:
                self.frames[i] = self.dataset[i]
        return idx, [self.frames[i] for i in idx]


def one_run(model: AcegModel, frames: list[Frame], queries: list[Frame], method: str, iterations: int,
            args: argparse.Namespace, map_path: Path) -> dict:
    """Map with one method and budget, then localize the queries; the figures of that run."""
    cfg = mapping_config(args, method, iterations)
    torch.manual_seed(args.seed)
    gc.collect()  # the previous run's feature cache must not count in this run's memory
    progress, bar = progress_bar(iterations, f"{method} {len(frames)} frames")
    with MemoryProbe(model.device) as mem:
        t0 = time.perf_counter()
        scene_map, report = map_scene(model, frames, cfg, progress)
        wall = time.perf_counter() - t0
    bar.close()
    scene_map.save(map_path)
    accuracy = evaluate_queries(Localizer(model, scene_map), queries, desc=f"localize ({method})")
    return {
        "mapping": {"seconds": report.seconds, "wall_seconds": wall,
                    **{k: v for k, v in asdict(report).items() if k not in ("method", "n_frames", "iterations")}},
        "accuracy": {k: accuracy[k] for k in ACCURACY_KEYS},
        "memory": mem.result,
        "map_bytes": map_path.stat().st_size,
    }


def headline(run: dict) -> dict:
    """The figures compared between methods of the same (frames, iterations)."""
    return {"mapping_seconds": run["mapping"]["seconds"], "mapping_wall_seconds": run["mapping"]["wall_seconds"],
            **{k: run["accuracy"][k] for k in ACCURACY_KEYS if k != "n_query"},
            "peak_rss_growth_bytes": run["memory"]["peak_rss_growth_bytes"],
            "cuda_peak_bytes": run["memory"].get("cuda_peak_bytes"),
            "map_bytes": run["map_bytes"]}


def ratio_table(runs: list[dict]) -> list[dict]:
    """aceg/ace of every headline figure, per (frames, iterations) where both methods finished."""
    by_key = {(r["n_frames"], r["iterations"], r["method"]): r for r in runs}
    table = []
    for (n, it, method), r in by_key.items():
        if method == "aceg" and (n, it, "ace") in by_key:
            table.append({"n_frames": n, "iterations": it,
                          "ratios": ratios(r["figures"], by_key[(n, it, "ace")]["figures"])})
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = start_run(NAME, args)
    if started is None:
        return 2
    device, model, mapping_ds, query_ds, json_path, out = started
    if max(args.frames) > len(mapping_ds):
        print(f"{NAME}: the mapping split has {len(mapping_ds)} frames; larger --frames use all of them",
              file=sys.stderr)

    cache = FrameCache(mapping_ds)
    query_idx = evenly_spaced(len(query_ds), args.queries)
    queries = [query_ds[i] for i in query_idx]
    out["data"] = {"path": str(args.data), "n_mapping_split": len(mapping_ds), "n_query_split": len(query_ds),
                   "query_frames": [query_ds.names[i] for i in query_idx]}
    out["runs"] = []

    # One-off torch set-up (seconds on CPU) would otherwise land on the first run's mapping time.
    _, warm = cache.subset(MIN_MAPPING_FRAMES)
    for method in args.methods:
        map_scene(model, warm, MappingConfig(method=method, iterations=2, batch_patches=256))

    plan = list(itertools.product(sorted(set(args.frames)), sorted(set(args.iterations)), args.methods))
    with tempfile.TemporaryDirectory(prefix="bench_mapping_") as tmp:
        for k, (n_req, iterations, method) in enumerate(plan, start=1):
            _, frames = cache.subset(n_req)
            run = {"method": method, "n_frames_requested": n_req, "n_frames": len(frames), "iterations": iterations,
                   **one_run(model, frames, queries, method, iterations, args, Path(tmp) / f"{method}.safetensors"),
                   "finished_at": now()}
            run["figures"] = headline(run)
            out["runs"].append(run)
            out["ratio_aceg_over_ace"] = ratio_table(out["runs"])
            write_json(json_path, out)
            acc, m = run["accuracy"], run["mapping"]
            print(f"[{k}/{len(plan)}] {method:4s} {len(frames):4d} frames {iterations:5d} it: "
                  f"mapping {m['seconds']:7.1f} s, 5cm/5deg {acc['pct_5cm_5deg']:5.1f} %, "
                  f"10cm/10deg {acc['pct_10cm_10deg']:5.1f} %, failed {acc['n_failed']}/{acc['n_query']}, "
                  f"map {run['map_bytes'] / 1e6:.2f} MB", flush=True)

    return finish_run(json_path, out)


if __name__ == "__main__":
    raise SystemExit(main())
