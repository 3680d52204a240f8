"""How well an encoder's features match between real photos of a place taken from known poses.

For each pair of images one or two apart in a real posed sequence, every cell of A is matched
to its nearest cell of B (cosine of the working-resolution features) and the matches that are
mutual nearest neighbours are kept. A match is counted as consistent when B's cell centre lies
within 4 (or 8) working pixels of the epipolar line of A's cell centre, from the ground-truth
poses. The pixels along the line are not checked (there is no depth), so the share is an upper
bound on the share of right matches. Each set also reports how often a random cell of B lies as
close to the line (``chance_pct_within_*``): about 3 % within 4 px on both sequences.

With ``--fine``, the same matches at the fine scale too, as the pixel refinement places a
correspondence (``aceg_model/pixel_refinement.py``): the fine key of A's cell centre (both photos
encoded at 3x the working height) is searched for within 6 working pixels of B's cell centre,
and the refined pixel's distance to the line is reported beside the cell centre's (``fine_*``),
for the matches within 8 px of their line whose window lies inside B. Only the distance across
the line is measured; a refinement that knew the true match would put every one on it.

Sequences (``../shared/data``), both tuning sequences, measured here and never trained on:
Strecha Herz-Jesus-P25 (25 stills, 1536x1024) and KITTI 06 frames 0-50 (a car's forward motion).
The epipolar term of pre-training (``--w-epi``) trains on other sequences
(``aceg_model/epipolar_pairs.py``).

A few seconds per model on the 2-core CPU (about a minute more with ``--fine``):

    python benchmarks/real_pair_matching.py --models models/aceg_small.safetensors runs/x/pca/model.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import REPO, default_json, finish_run, load_model, model_info, run_header

from aceg_model.encoder import patch_centres
from aceg_model.epipolar_pairs import EpipolarPairs, PosedImage, fundamental, line_distances
from aceg_model.landmarks import SweepViews
from aceg_model.pixel_refinement import fine_queries, refine_pixels
from aceg_model.scene.textures import default_shared_data

NAME = "real_pair_matching"
SEQUENCES = {"herzjesu": "strecha-mvs-gt/Herz-Jesus-P25", "kitti06": "kitti-odometry-snippets/seq06_frames000-050"}
BANDS_PX = (4.0, 8.0)
FINE_SCALE, WINDOW_PX = 3, 6  # the pixel refinement's (PnPConfig defaults)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=Path, nargs="+", default=[REPO / "models" / "aceg_small.safetensors"],
                   help="model files to measure")
    p.add_argument("--sequences", nargs="+", choices=list(SEQUENCES), default=list(SEQUENCES),
                   help="real posed sequences to measure")
    p.add_argument("--max-gap", type=int, default=2, help="pairs are images 1..max-gap apart")
    p.add_argument("--fine", action="store_true",
                   help="also refine the matches at the fine scale and measure them against the line")
    p.add_argument("--data", type=Path, default=None, help="the shared data folder (default: ../shared/data)")
    p.add_argument("--json", type=Path, default=None,
                   help="output JSON (default: benchmarks/results/<benchmark>-<machine tag>.json)")
    args = p.parse_args(argv)
    if args.max_gap < 1:
        p.error("--max-gap must be >= 1")
    return args


def mutual_matches(model, a: PosedImage, b: PosedImage) -> tuple[np.ndarray, np.ndarray]:
    """Working-pixel centres (N x 2 each) of the cells of a and b that are each other's nearest."""
    with torch.no_grad():
        feats = model.encoder(torch.from_numpy(np.stack([a.image_hw, b.image_hw]))[:, None].float())
    D, h, w = feats.shape[1:]
    fa, fb = (F.normalize(f.flatten(1), dim=0) for f in feats)
    sim = fa.T @ fb
    best_b, best_a = sim.argmax(1), sim.argmax(0)
    mutual = torch.nonzero(best_a[best_b] == torch.arange(h * w)).flatten()
    centres = patch_centres(h, w).double()
    return centres[mutual].numpy(), centres[best_b[mutual]].numpy()


class FineGrids:
    """Each image's fine queries (``fine_queries`` of ``PosedImage.fine``), encoded once per model."""

    def __init__(self, model) -> None:
        self.model, self.grids = model, {}

    @torch.no_grad()
    def __call__(self, x: PosedImage) -> SweepViews:
        if id(x) not in self.grids:
            grid, hw = fine_queries(self.model, torch.from_numpy(x.fine.image_hw)[None])
            self.grids[id(x)] = SweepViews(grid[None], hw, None, None, FINE_SCALE)
        return self.grids[id(x)]


def refined_line_distances(grids: FineGrids, a: PosedImage, b: PosedImage, uv_a: np.ndarray, uv_b: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Line distances of B's cell centres and of the pixels the refinement moves them to, for the
    matches within 8 px of their line whose search window lies inside B."""
    F_33 = fundamental(a, b)
    before = line_distances(F_33, uv_a, uv_b)
    H, W = b.image_hw.shape
    margin = WINDOW_PX + 2
    ok = (before <= BANDS_PX[-1]) & (uv_b >= margin).all(1) & (uv_b[:, 0] <= W - 1 - margin) \
        & (uv_b[:, 1] <= H - 1 - margin)
    if not ok.any():
        return np.zeros(0), np.zeros(0)
    views_a, views_b = grids(a), grids(b)
    ua = torch.as_tensor(uv_a[ok], dtype=torch.float32)
    keys = F.normalize(views_a.sample(torch.zeros(len(ua), dtype=torch.long), views_a.to_sweep_pixels(ua)), dim=1)
    refined, _ = refine_pixels(keys, views_b.desc_IPD[0], views_b.hw, FINE_SCALE,
                               torch.as_tensor(uv_b[ok], dtype=torch.float32), WINDOW_PX)
    return before[ok], line_distances(F_33, uv_a[ok], refined.numpy().astype(np.float64))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")
    data = args.data or default_shared_data()
    try:
        models = [(path, load_model(path, device).eval()) for path in args.models]
        heights = {m.config.image_height for _, m in models}
        if len(heights) != 1:
            raise ValueError(f"the models work at different heights: {sorted(heights)}")
        height = heights.pop()
        sets = {name: EpipolarPairs(height, data_dir=data, sequences=(SEQUENCES[name],), max_gap=args.max_gap,
                                    fine_scale=FINE_SCALE if args.fine else None)
                for name in args.sequences}
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {**run_header(NAME, args, device), "models": [model_info(m, p) for p, m in models], "results": {}}
    for name, pairs in sets.items():
        grids = {path: FineGrids(model) for path, model in models}  # kept across the gaps
        for gap in range(1, args.max_gap + 1):
            chosen = [(i, j) for i, j in pairs.pairs if j - i == gap]
            for path, model in models:
                counts, dists, chance, fine = [], [], [], []
                rng = np.random.default_rng(0)
                for i, j in chosen:
                    a, b = pairs.images[i], pairs.images[j]
                    uv_a, uv_b = mutual_matches(model, a, b)
                    F_33 = fundamental(a, b)
                    counts.append(len(uv_a))
                    dists.append(line_distances(F_33, uv_a, uv_b))
                    h, w = (n // 8 for n in b.image_hw.shape)
                    cells = rng.integers(0, [w, h], (len(uv_a), 2))
                    chance.append(line_distances(F_33, uv_a, 8 * cells + 3.5))
                    if args.fine:
                        fine.append(refined_line_distances(grids[path], a, b, uv_a, uv_b))
                d, r = np.concatenate(dists), np.concatenate(chance)
                result = {"pairs": len(chosen), "mutual_per_pair": float(np.mean(counts)),
                          **{f"pct_within_{band:g}px": float(100 * np.mean(d <= band)) for band in BANDS_PX},
                          "median_line_px": float(np.median(d)),
                          **{f"chance_pct_within_{band:g}px": float(100 * np.mean(r <= band)) for band in BANDS_PX}}
                if args.fine:
                    before, after = (np.concatenate([f[k] for f in fine]) for k in (0, 1))
                    result.update({"fine_matches": int(len(after)), "fine_start_median_line_px": float(np.median(before)),
                                   "fine_median_line_px": float(np.median(after)),
                                   **{f"fine_start_pct_within_{t}px": float(100 * np.mean(before <= t)) for t in (1, 2)},
                                   **{f"fine_pct_within_{t}px": float(100 * np.mean(after <= t)) for t in (1, 2)}})
                out["results"].setdefault(f"{name}/gap{gap}", {})[str(path)] = result
                print(f"{name}/gap{gap} {path}: {result['mutual_per_pair']:.0f} mutual matches per pair, "
                      + ", ".join(f"{result[f'pct_within_{b:g}px']:.1f} % within {b:g} px" for b in BANDS_PX)
                      + f" of the line (median {result['median_line_px']:.1f} px; a random cell: "
                      + f"{result['chance_pct_within_4px']:.1f} % within 4 px)", flush=True)
                if args.fine:
                    print(f"  refined at the fine scale: {result['fine_pct_within_1px']:.1f} % within 1 px of the line "
                          f"(cell centres {result['fine_start_pct_within_1px']:.1f} %), median "
                          f"{result['fine_median_line_px']:.2f} px (cell centres {result['fine_start_median_line_px']:.2f}; "
                          f"{result['fine_matches']} matches)", flush=True)
    return finish_run(args.json or default_json(NAME, device), out)


if __name__ == "__main__":
    sys.exit(main())
