"""aceg-gen-scene: write generated scenes as posed-image folders (the layout real datasets use).

    aceg-gen-scene out/ --seed 3                    # out/ holds one scene
    aceg-gen-scene out/ --seed 0 --count 10         # out/scene-000000 ... scene-000009
    aceg-gen-scene out/ --contact-sheet sheet.png   # also a picture of mapping vs query views
    aceg-gen-scene --benchmark                      # render speed (frames/s) as JSON

Each folder has ``frames/frame-XXXXXX.{color.png,pose.txt,depth.png}``,
``intrinsics.yaml``, splits ``mapping.txt``, ``query.txt`` and one
``query-<condition>.txt`` per query condition, and ``generator.json`` (seed,
configuration, appearance of every frame). Bags come from the ROS side
(aceg_model never imports it): ``aceg-make-bag --data out/ --kind folder
--split mapping --out mapping_bag``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from aceg_model.scene.appearance import PRESETS
from aceg_model.scene.generate import GeneratedScene, QuerySpec, SceneConfig, default_queries, generate_scene


def build_config(args: argparse.Namespace) -> SceneConfig:
    queries = {name: spec for name, spec in default_queries().items() if name in args.queries}
    if args.query_frames is not None:
        queries = {name: replace(spec, n_frames=args.query_frames) for name, spec in queries.items()}
    if args.query_appearance is not None:
        queries = {name: replace(spec, appearance=args.query_appearance) if name == "lighting" else spec
                   for name, spec in queries.items()}
    return SceneConfig(kind=args.kind, style=args.style, width=args.width, height=args.height,
                       focal_range_px=tuple(args.focal), mapping_frames=args.mapping_frames, queries=queries,
                       shadows=not args.no_shadows, use_shared_data=not args.no_shared_data,
                       cache_dir=args.cache_dir)


def write_scene(gen: GeneratedScene, out_dir: Path) -> Path:
    """Write one generated scene as a posed folder with mapping/query splits."""
    from aceg_model.datasets import write_posed_folder  # lazy: keeps the generator free of dataset I/O

    frames = gen.mapping + [f for seq in gen.queries.values() for f in seq]
    splits = {"mapping": [f.name for f in gen.mapping],
              "query": [f.name for seq in gen.queries.values() for f in seq]}
    splits.update({f"query-{name}": [f.name for f in seq] for name, seq in gen.queries.items()})
    write_posed_folder(frames, out_dir, splits=splits)
    info = {"seed": gen.seed, "kind": gen.scene.layout.kind, "style": gen.style,
            "config": json.loads(json.dumps(asdict(gen.config), default=str)),
            "frames": {f.name: {"condition": f.meta["condition"], "appearance": f.meta["appearance"]}
                       for f in frames}}
    (Path(out_dir) / "generator.json").write_text(json.dumps(info, indent=1))
    return Path(out_dir)


def contact_sheet(scenes: list[GeneratedScene], path: Path, per_sequence: int = 2) -> Path:
    """A grid PNG: one row per scene, ``per_sequence`` mapping views, then each query
    condition's, then the first mapping view under a 'random_strong' draw (the pre-training range)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("mapping", k) for k in range(per_sequence)]
    columns += [(name, k) for name in scenes[0].queries for k in range(per_sequence)]
    columns += [("random_strong", 0)]
    fig, axes = plt.subplots(len(scenes), len(columns), figsize=(2.2 * len(columns), 1.75 * len(scenes)),
                             squeeze=False)
    for row, gen in zip(axes, scenes):
        for ax, (seq, k) in zip(row, columns):
            if seq == "random_strong":
                image = PRESETS[seq].apply(gen.mapping[0].image, np.random.default_rng(gen.seed))
            else:
                frames = gen.mapping if seq == "mapping" else gen.queries[seq]
                image = frames[k * (len(frames) - 1) // max(per_sequence - 1, 1)].image
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            if ax is row[0]:
                ax.set_ylabel(f"seed {gen.seed}\n{gen.scene.layout.kind}, {gen.style}", fontsize=7)
            if gen is scenes[0]:
                ax.set_title(seq, fontsize=8)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def benchmark(seed: int, repeats: int) -> dict:
    """Frames/s of `render_view` at the pre-training and full resolutions, with and without
    shadows: 1 / median time per frame over ``repeats`` poses (the median resists other load)."""
    from aceg_model.frames import Intrinsics
    from aceg_model.scene.render import render_view

    result = {}
    for kind in ("room", "street"):
        gen = generate_scene(seed, SceneConfig(kind=kind, width=160, height=120, mapping_frames=repeats, queries={}))
        for h, w in ((120, 160), (240, 320), (480, 640)):
            K = Intrinsics.centred(550.0 * w / 640, w, h)
            for shadows in (False, True):
                render_view(gen.scene, gen.mapping[0].T_world_cam, K, shadows=shadows)  # warm-up
                seconds = []
                for f in gen.mapping:
                    t0 = time.perf_counter()
                    render_view(gen.scene, f.T_world_cam, K, shadows=shadows)
                    seconds.append(time.perf_counter() - t0)
                fps = 1.0 / float(np.median(seconds))
                result[f"{kind}_{h}x{w}_{'shadows' if shadows else 'no_shadows'}_fps"] = round(fps, 1)
    result["torch_threads"] = 1
    result["load_average_1min"] = os.getloadavg()[0]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aceg-gen-scene", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", type=Path, nargs="?", help="output folder (required unless --benchmark)")
    p.add_argument("--seed", type=int, default=0, help="seed of the (first) scene")
    p.add_argument("--count", type=int, default=1, help="number of scenes, seeds seed .. seed+count-1")
    p.add_argument("--kind", choices=["mixed", "room", "street"], default="mixed", help="scene type")
    p.add_argument("--style", choices=["random", "handheld", "wheeled"], default="random", help="camera motion")
    p.add_argument("--width", type=int, default=640, help="image width, px")
    p.add_argument("--height", type=int, default=480, help="image height, px")
    p.add_argument("--focal", type=float, nargs=2, default=(500.0, 600.0), metavar=("MIN", "MAX"),
                   help="focal length range, px (one drawn per scene)")
    p.add_argument("--mapping-frames", type=int, default=SceneConfig.mapping_frames,
                   help="frames in the mapping sequence (spread once over the whole camera path)")
    p.add_argument("--query-frames", type=int, default=None, help="frames per query sequence (default 30)")
    p.add_argument("--queries", nargs="*", choices=sorted(default_queries()), default=sorted(default_queries()),
                   help="query conditions to render")
    p.add_argument("--query-appearance", default=None, choices=sorted(PRESETS),
                   help="appearance preset of the 'lighting' queries instead of its default change")
    p.add_argument("--no-shadows", action="store_true", help="no cast shadows (faster)")
    p.add_argument("--no-shared-data", action="store_true",
                   help="texture only with scikit-image samples and procedural patterns, not ../shared/data")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep built scenes (textures) here for reuse")
    p.add_argument("--contact-sheet", type=Path, default=None, help="also save a PNG of mapping vs query views")
    p.add_argument("--benchmark", action="store_true", help="print render speed (frames/s) as JSON and exit")
    args = p.parse_args(argv)

    if args.benchmark:
        print(json.dumps(benchmark(args.seed, repeats=10), indent=1))
        return 0
    if args.out_dir is None:
        p.error("out_dir is required (or use --benchmark)")
    if args.count < 1:
        p.error(f"--count must be >= 1, got {args.count}")
    from tqdm import tqdm

    config = build_config(args)
    n_frames = config.mapping_frames + sum(q.n_frames for q in config.queries.values())
    scenes = []
    for seed in range(args.seed, args.seed + args.count):
        out = args.out_dir if args.count == 1 else args.out_dir / f"scene-{seed:06d}"
        with tqdm(total=n_frames, desc=f"scene {seed}", unit="frame", file=sys.stderr) as bar:
            gen = generate_scene(seed, config, progress=lambda _: bar.update())
        write_scene(gen, out)
        print(f"scene {seed} ({gen.scene.layout.kind}, {gen.style}, f={gen.intrinsics.fx:.0f} px): "
              f"{len(gen.mapping)} mapping + {sum(map(len, gen.queries.values()))} query frames -> {out}")
        if args.contact_sheet is not None:
            scenes.append(gen)
    if scenes:
        print(f"contact sheet -> {contact_sheet(scenes, args.contact_sheet)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
