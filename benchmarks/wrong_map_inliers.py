"""Inlier counts of necessarily wrong poses, to set ``PnPConfig.min_inliers``.

Localizes the query images of one posed folder against the map of another
place with ``min_inliers`` 4, so that every returned pose is wrong, and
reports RANSAC's inlier counts: the evidence a wrong pose can gather by
chance. Pairs of generated rooms are the intended input (never the held-out
7-Scenes kitchen):

    python -m aceg_model.scene.cli runs/room900001 --seed 900001 --kind room --style handheld --queries lighting
    aceg-eval --data runs/room900001 --mapping-list runs/room900001/mapping.txt \\
        --query-list runs/room900001/query-lighting.txt --save-map runs/room900001/aceg.map --json /tmp/a.json
    (the same for seed 900003), then
    python benchmarks/wrong_map_inliers.py runs/room900001 runs/room900003/aceg.map \\
        runs/room900003 runs/room900001/aceg.map
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from aceg_model.datasets import open_dataset
from aceg_model.evaluate import DEFAULT_MODEL
from aceg_model.localizer import Localizer
from aceg_model.mapping import SceneMap
from aceg_model.model import AcegModel
from aceg_model.pnp import PnPConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pairs", nargs="+", help="QUERY_FOLDER MAP_FILE [QUERY_FOLDER MAP_FILE ...] (different places)")
    p.add_argument("--query-list", default="query-lighting.txt", help="query list file inside each folder")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pre-trained model (safetensors)")
    p.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = p.parse_args(argv)
    if len(args.pairs) % 2:
        p.error("give query folders and map files in pairs")
    model = AcegModel.load(args.model)
    counts: list[int] = []
    try:
        for folder, map_file in zip(args.pairs[::2], args.pairs[1::2]):
            queries = open_dataset(Path(folder), "auto", Path(folder) / args.query_list)
            localizer = Localizer(model, SceneMap.load(map_file, model), PnPConfig(min_inliers=4))
            counts += [localizer.localize(queries[i].image, queries[i].intrinsics).n_inliers
                       for i in range(len(queries))]
    except (ValueError, FileNotFoundError) as e:
        print(f"wrong_map_inliers: {e}", file=sys.stderr)
        return 2
    c = np.array(counts)
    summary = {"n": len(c), "max": int(c.max()), "p95": float(np.percentile(c, 95)), "median": float(np.median(c)),
               "pairs": args.pairs}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({**summary, "counts": counts}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
