"""How precisely an encoder's fine keys place a match: the pixel refinement's error on view pairs
whose correspondences are exact.

The localizer moves each patch's pixel, within 6 working pixels, to where the fine key of its
matched landmark fits the query's fine descriptors best (``aceg_model/pixel_refinement.py``).
Here the fine key is taken at a known point of view A, the search starts up to 4 px (each axis)
beside that point's true projection in view B, and the error is how far the refined pixel lands
from the true one, in working pixels (240 px height). A refinement that did nothing would keep
the start's median of about 3.2 px.

Pairs, drawn with fixed seeds:
- ``generated/mapping``, ``generated/query``: view pairs of generated scenes (seeds 0-7, the PCA
  fit's bank, rendered into ``--bank`` on first use): two mapping views, or a mapping view and a
  query view under a strong photometric change. Rendered at the working resolution, so their fine
  encoding (3x) is of an upsampled image.
- ``photo480``, ``photo720``: two views of a Strecha Herz-Jesus-P25 photo laid on a plane
  (``aceg_model/photo_pairs.py``; the second under a strong photometric change), rendered at 480 px
  (a 640x480 camera's fine encoding) and at 720 px. The photo is 640 px wide and a view shows
  0.35-0.8 of it, so both views magnify it (1.4-3.2x at 480 px).
- ``photo480sharp``: the same at 480 px from the photo at 1024 px, each view showing 0.6-1.0 of
  it (0.7-1.2x its own pixels), as ``aceg-pretrain --fine-photo-prob`` draws its pairs: a sharp
  640x480 camera. Herz-Jesus is a tuning sequence: measured here, never trained on.

About 20 s per model on the 2-core CPU:

    python benchmarks/fine_precision.py --models models/aceg_small.safetensors runs/x/pca/model.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import REPO, default_json, finish_run, load_model, model_info, run_header

from aceg_model.landmarks import scaled_pixels
from aceg_model.pixel_refinement import encode_fine, refine_pixels
from aceg_model.pretrain import bilinear
from aceg_model.pretrain_data import View, load_views, render_bank
from aceg_model.scene import correspondences

NAME = "fine_precision"
SETS = ("generated/mapping", "generated/query", "photo480", "photo720", "photo480sharp")
SCALE, WINDOW_PX, START_PX = 3, 6, 4.0
HERZ_JESUS = REPO.parent / "shared" / "data" / "strecha-mvs-gt" / "Herz-Jesus-P25" / "images"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=Path, nargs="+", default=[REPO / "models" / "aceg_small.safetensors"],
                   help="model files to measure")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="pair sets to measure")
    p.add_argument("--pairs", type=int, default=32, help="pairs per set")
    p.add_argument("--bank", type=Path, default=REPO / "runs" / "bank8",
                   help="generated scenes of seeds 0-7 (rendered here when missing)")
    p.add_argument("--json", type=Path, default=None,
                   help="output JSON (default: benchmarks/results/<benchmark>-<machine tag>.json)")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    if any(s.startswith("photo") for s in args.sets) and not HERZ_JESUS.is_dir():
        p.error(f"the photo sets need {HERZ_JESUS} (../shared beside the repository); or pass --sets generated/...")
    return args


def draw_pairs(name: str, bank: Path, n: int) -> list[tuple[View, View]]:
    """``n`` view pairs of set ``name``, the same on every run."""
    from aceg_model.photo_pairs import PhotoPairs, vga_photo_pairs

    rng = np.random.default_rng(7)
    scenes = [load_views(f) for f in sorted(bank.glob("scene-*[0-9].npz"))]
    if name.startswith("generated"):
        return [scenes[k % len(scenes)].view_pair(name.endswith("query"), rng) for k in range(n)]
    sources = [f"file:{p}" for p in sorted(HERZ_JESUS.glob("*.jpg"))]
    photos = vga_photo_pairs(sources) if name.endswith("sharp") else PhotoPairs(sources)
    working = scenes[0].mapping[0].intrinsics
    factor = 2 if name.startswith("photo480") else 3
    K = working.resized(working.width * factor, working.height * factor)
    return [photos.pair(K, True, rng) for _ in range(n)]


def keys_at(grid_PK: torch.Tensor, hw: tuple[int, int], fine_px_N2: torch.Tensor) -> torch.Tensor:
    """Unit fine keys at fine-grid pixels, bilinearly interpolated (as mapping takes them)."""
    return F.normalize(bilinear(grid_PK.T.reshape(-1, *hw), fine_px_N2, None), dim=1)


@torch.no_grad()
def pair_errors(model, a: View, b: View, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Start and refined errors (working pixels) of up to 256 exact matches of one pair."""
    uv_a, uv_b = correspondences(a, b, 256, rng)
    if len(uv_a) < 16:
        return np.zeros(0), np.zeros(0)
    working = model.config.image_height
    to_working = working / a.intrinsics.height
    ua = scaled_pixels(torch.as_tensor(uv_a, dtype=torch.float32), to_working)
    ub = scaled_pixels(torch.as_tensor(uv_b, dtype=torch.float32), to_working)
    grid_a, hw_a, _ = encode_fine(model, a.image, a.intrinsics, SCALE)
    grid_b, hw_b, _ = encode_fine(model, b.image, b.intrinsics, SCALE)
    keys = keys_at(grid_a, hw_a, scaled_pixels(ua, SCALE))
    start = ub + torch.as_tensor(rng.uniform(-START_PX, START_PX, ub.shape), dtype=torch.float32)
    W, H = working * a.intrinsics.width / a.intrinsics.height, working
    margin = WINDOW_PX + 2  # the whole window inside the image
    ok = ((start[:, 0] >= margin) & (start[:, 0] <= W - 1 - margin) & (start[:, 1] >= margin)
          & (start[:, 1] <= H - 1 - margin))
    refined, _ = refine_pixels(keys[ok], grid_b, hw_b, SCALE, start[ok], WINDOW_PX)
    return (start[ok] - ub[ok]).norm(dim=1).numpy(), (refined - ub[ok]).norm(dim=1).numpy()


def summary(start: np.ndarray, refined: np.ndarray) -> dict:
    return {"matches": int(len(refined)), "start_median_px": float(np.median(start)),
            "median_px": float(np.median(refined)),
            **{f"pct_within_{t}px": float(100 * np.mean(refined <= t)) for t in (0.5, 1, 2)},
            "pct_beyond_4px": float(100 * np.mean(refined > 4))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")
    try:
        models = [(path, load_model(path, device).eval()) for path in args.models]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Every set needs the bank: the photo sets take their camera from its first scene.
    if len(list(args.bank.glob("scene-*[0-9].npz"))) < 8:
        print(f"rendering the generated scenes of seeds 0-7 into {args.bank} (about a minute)", flush=True)
        render_bank(args.bank, 0, 8)
    out = {**run_header(NAME, args, device), "models": [model_info(m, p) for p, m in models], "results": {}}
    for name in args.sets:
        pairs = draw_pairs(name, args.bank, args.pairs)
        for path, model in models:
            rng = np.random.default_rng(1)  # the same matches and starts for every model
            errors = [pair_errors(model, a, b, rng) for a, b in pairs]
            result = summary(np.concatenate([e[0] for e in errors]), np.concatenate([e[1] for e in errors]))
            out["results"].setdefault(name, {})[str(path)] = result
            print(f"{name:18s} {path}: median {result['median_px']:.2f} px (start {result['start_median_px']:.2f}), "
                  f"within 1 px {result['pct_within_1px']:.1f} %, 2 px {result['pct_within_2px']:.1f} %, "
                  f"beyond 4 px {result['pct_beyond_4px']:.1f} % ({result['matches']} matches)", flush=True)
    return finish_run(args.json or default_json(NAME, device), out)


if __name__ == "__main__":
    sys.exit(main())
