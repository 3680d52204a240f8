"""The end-to-end demo behind ``./scripts/demo.sh``: bags -> node -> map_scene -> replay -> table and plots.

    python -m aceg_ros.demo                                   # a generated room, no downloaded data
    python -m aceg_ros.demo --data ../shared/data/7scenes-redkitchen-1000

1. **Data as bags.** By default the project's scene generator renders a room
   (``aceg_model.scene``): a mapping sequence and two query sequences, one under
   changed lighting and one from new viewpoints. With ``--data`` a real posed-image
   dataset's mapping / query split is used instead (evenly subsampled), with a
   second, darkened copy of the queries (``aceg-eval --perturb``'s 'darker') as
   the changed-lighting condition. Each sequence is written as a rosbag2 bag
   (images, camera_info, PoseStamped and /tf) with ``aceg_ros.bag_io``; bags are
   reused on a later run with the same settings (``--fresh`` rewrites them).
   Sequences are stamped 1000 s apart, as recordings made one after another.
2. **The node.** ``aceg_localizer`` starts in this process (lifecycle: configure
   loads the shipped model, activate subscribes), on a multi-threaded executor.
3. **Mapping over DDS.** The ``mapping.*`` parameters are set through the node's
   parameter service and ``/aceg/map_scene`` (std_srvs/Trigger) is called, as a
   user would with ``ros2 param set`` and ``ros2 service call``; progress comes
   from ``/aceg/mapping_progress``. The node writes the map and swaps it in.
4. **Replay over DDS.** Each query bag is played to the node (``aceg_ros.replay``:
   images and camera_info on ``/aceg/image`` and ``/aceg/camera_info`` with their
   bag stamps, the next image once the node answered the previous one), its poses
   on ``/aceg/pose`` are matched to the bag's ground truth by stamp.
5. **Results.** A table per query condition (accuracy, failures, latency,
   throughput) and, under ``--out``: one folder per condition with ``replay.json``,
   ``report.md`` and the plots, plus ``summary.md``, ``summary.json`` and
   ``conditions_cdf.png``.

Uses the shipped checkpoint ``models/aceg_small.safetensors`` and stops with a
clear message when it is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "aceg_small.safetensors"
DEFAULT_OUT = REPO / "out" / "demo"
SEQUENCE_GAP_S = 1000.0  # stamp offset between sequences: recordings made one after another
GENERATED = {"mapping_frames": 80, "query_frames": 25}
REAL = {"mapping_frames": 100, "query_frames": 50}
BAG_OPTIONS = {"storage": "mcap"}
DEMO_SEED = 900_000  # a room the model never saw: pre-training banks use seeds 0 .. 99_999


def say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


# --- step 1: bags ------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 320x240; got {text!r}") from None
    if w < 64 or h < 48:
        raise argparse.ArgumentTypeError(f"size must be at least 64x48 px, got {text!r}")
    return w, h


def _restamp(frames, offset_s: float) -> list:
    return [replace(f, stamp=f.stamp + offset_s) for f in frames]


def _evenly(seq, n: int) -> list:
    """``n`` items spread evenly over ``seq`` (all when it has fewer)."""
    if n >= len(seq):
        return [seq[i] for i in range(len(seq))]
    return [seq[int(i)] for i in np.linspace(0, len(seq) - 1, n).round()]


def generated_sequences(seed: int, size: tuple[int, int], n_map: int, n_query: int) -> tuple[dict, str]:
    """Mapping + 'lighting' + 'viewpoint' frames of generated room ``seed``; (sequences, description)."""
    from tqdm import tqdm

    from aceg_model.scene import SceneConfig, default_queries, generate_scene

    w, h = size
    queries = {name: replace(spec, n_frames=n_query) for name, spec in default_queries().items()}
    # 7-Scenes-like field of view (f ~ 525 px at 640 px wide), whatever the size.
    focal = (500.0 * w / 640, 600.0 * w / 640)
    config = SceneConfig(kind="room", width=w, height=h, focal_range_px=focal, mapping_frames=n_map, queries=queries)
    total = n_map + n_query * len(queries)
    with tqdm(total=total, desc=f"rendering scene {seed} ({w}x{h})", unit="frame", file=sys.stderr) as bar:
        gen = generate_scene(seed, config, progress=lambda _: bar.update())
    seqs = {"mapping": gen.mapping, **gen.queries}
    text = (f"generated {gen.scene.layout.kind} (seed {seed}, {gen.style} camera, f={gen.intrinsics.fx:.0f} px, "
            f"{w}x{h}): {n_map} mapping frames; queries: 'lighting' = same path under dimmed, warmer, moved "
            f"lights with darker exposure and noise; 'viewpoint' = a new path, higher, turned and shifted")
    return seqs, text


def dataset_sequences(data: Path, n_map: int, n_query: int) -> tuple[dict, str]:
    """The dataset's mapping / query split, subsampled, plus the queries darkened; (sequences, description)."""
    from aceg_model.datasets import open_dataset
    from aceg_model.evaluate import perturb

    mapping = open_dataset(data, "auto", "mapping")
    queries = open_dataset(data, "auto", "query")
    seqs = {"mapping": _evenly(mapping, n_map), "recorded": _evenly(queries, n_query)}
    seqs["darker"] = [f.with_image(perturb(f.image, "darker", seed=i)) for i, f in enumerate(seqs["recorded"])]
    text = (f"{data} ({mapping.kind}): {len(seqs['mapping'])} of {len(mapping)} mapping frames, "
            f"{len(seqs['recorded'])} of {len(queries)} query frames as recorded and darkened")
    return seqs, text


def prepare_bags(args: argparse.Namespace, out: Path) -> tuple[dict[str, Path], str]:
    """Write (or reuse) the mapping and query bags; ({'mapping': bag, condition: bag, ...}, description)."""
    from aceg_ros.bag_io import write_bag

    n_map, n_query = args.mapping_frames, args.query_frames
    if args.data is not None:
        key = f"{args.data.resolve().name}-m{n_map}-q{n_query}"
    else:
        key = f"scene{args.seed}-{args.size[0]}x{args.size[1]}-m{n_map}-q{n_query}"
    folder = out / "bags" / key
    done = folder / "bags.json"
    if done.is_file() and not args.fresh:
        info = json.loads(done.read_text())
        bags = {name: folder / name for name in info["sequences"]}
        if all(p.is_dir() for p in bags.values()):
            say(f"reusing the bags in {folder} (--fresh to rewrite them)")
            return bags, info["description"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    if args.data is not None:
        seqs, text = dataset_sequences(args.data, n_map, n_query)
    else:
        seqs, text = generated_sequences(args.seed, args.size, n_map, n_query)
    bags = {}
    for k, (name, frames) in enumerate(seqs.items()):
        summary = write_bag(_restamp(frames, k * SEQUENCE_GAP_S), folder / name, progress=True, **BAG_OPTIONS)
        say(str(summary))
        bags[name] = summary.path
    done.write_text(json.dumps({"sequences": list(seqs), "description": text}, indent=1))
    say(f"bags ready in {time.perf_counter() - t0:.0f} s")
    return bags, text


# --- steps 2-4: node, mapping, replay ----------------------------------------------------------


def mapping_positions(bag: Path) -> np.ndarray:
    """Camera positions (N x 3, map frame) of the mapping bag's pose topic, for the trajectory plots."""
    from aceg_ros import bag_io

    with bag_io.open_bag(bag) as reader:
        conns = bag_io.topic_connections(reader, bag, "/camera/pose", bag_io.POSE_TYPES, "pose")
        track, _ = bag_io.read_pose_track(reader, conns, bag)
    return track.poses[:, :3, 3]


def set_parameters(session, values: dict, timeout_s: float = 10.0) -> None:
    """Set node parameters through its parameter service over DDS (what ``ros2 param set`` does)."""
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    client = AsyncParameterClient(session.player.node, f"{session.namespace}/aceg_localizer")
    if not client.wait_for_services(timeout_sec=timeout_s):
        raise RuntimeError(f"the parameter service of {session.namespace}/aceg_localizer did not appear")
    future = client.set_parameters([Parameter(k, value=v) for k, v in values.items()])
    deadline = time.monotonic() + timeout_s
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not future.done():
        raise RuntimeError("setting the mapping parameters timed out")
    for name, result in zip(values, future.result().results):
        if not result.successful:
            raise RuntimeError(f"the node refused {name}={values[name]!r}: {result.reason}")


def map_scene_over_dds(session, timeout_s: float) -> str:
    """Call ``/aceg/map_scene`` (std_srvs/Trigger) and show ``/aceg/mapping_progress``; the node's answer."""
    from std_msgs.msg import String
    from std_srvs.srv import Trigger
    from tqdm import tqdm

    node = session.player.node
    bar = tqdm(desc="mapping (node)", unit="it", file=sys.stderr)

    done = threading.Event()

    def on_progress(msg: String) -> None:
        if done.is_set():
            return
        p = json.loads(msg.data)
        if p["stage"] != "optimize":
            bar.set_description(f"mapping (node): {p['stage']} {p['done']}/{p['total']}")
            return
        bar.set_description("mapping (node): optimize")
        bar.total = p["total"]
        bar.n = p["done"]
        if "loss" in p:
            bar.set_postfix(loss=f"{p['loss']:.3f}", px=f"{p.get('median_px', float('nan')):.1f}")
        bar.refresh()

    node.create_subscription(String, f"{session.namespace}/mapping_progress", on_progress, 50)
    client = node.create_client(Trigger, f"{session.namespace}/map_scene")
    try:
        if not client.wait_for_service(timeout_sec=10.0):
            raise RuntimeError(f"{session.namespace}/map_scene did not appear")
        future = client.call_async(Trigger.Request())
        deadline = time.monotonic() + timeout_s
        while not future.done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"map_scene did not answer within {timeout_s:.0f} s")
            time.sleep(0.1)
    finally:
        # The subscription and client stay until the session ends: destroying them while the
        # executor spins races with its wait set (ros2/rclpy#1284; a message in flight left an
        # InvalidHandle in a task that was printed at exit). The session destroys them after
        # its executor has stopped.
        done.set()
        bar.close()
    answer = future.result()
    if not answer.success:
        raise RuntimeError(f"map_scene failed: {answer.message}")
    return answer.message


# --- step 5: the table -------------------------------------------------------------------------


def _f(x, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


TABLE_HEAD = ("condition", "frames", "5cm/5°", "10cm/10°", "median cm", "median °", "no pose", "p50 ms",
              "p90 ms", "p99 ms", "frames/s")


def table_rows(reports: dict[str, dict]) -> list[tuple[str, ...]]:
    return [(name, str(r["n_frames"]), _f(r["pct_5cm_5deg"]) + " %", _f(r["pct_10cm_10deg"]) + " %",
             _f(r["median_trans_cm"]), _f(r["median_rot_deg"], ".2f"), str(r["n_failed"]),
             _f(r["latency_p50_ms"], ".0f"), _f(r["latency_p90_ms"], ".0f"), _f(r["latency_p99_ms"], ".0f"),
             _f(r["throughput_fps"], ".2f")) for name, r in reports.items()]


def text_table(reports: dict[str, dict]) -> str:
    rows = [TABLE_HEAD, *table_rows(reports)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEAD))]
    def line(r: tuple[str, ...]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])


def markdown_table(reports: dict[str, dict]) -> str:
    rows = [TABLE_HEAD, *table_rows(reports)]
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(TABLE_HEAD),
                      *("| " + " | ".join(r) + " |" for r in rows[1:])])


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aceg_ros.demo", description="End-to-end ACE-G demo: bags, the "
                                "node, mapping over DDS, replay of the query bags, accuracy table and plots.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="a real posed-image dataset with mapping/query splits "
                   "(e.g. ../shared/data/7scenes-redkitchen-1000) instead of a generated scene")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="generated scene seed (the default is held out of "
                   "pre-training, whose scenes use seeds below 100000)")
    p.add_argument("--size", type=_parse_size, default=(320, 240), metavar="WxH",
                   help="generated image size in px (the model works at 240 px height)")
    p.add_argument("--mapping-frames", type=int, default=None,
                   help=f"mapping frames (default {GENERATED['mapping_frames']} generated, "
                   f"{REAL['mapping_frames']} from --data, evenly subsampled)")
    p.add_argument("--query-frames", type=int, default=None,
                   help=f"frames per query condition (default {GENERATED['query_frames']} generated, "
                   f"{REAL['query_frames']} from --data)")
    p.add_argument("--iterations", type=int, default=300, help="mapping iterations (the node's mapping.iterations)")
    p.add_argument("--batch-patches", type=int, default=4096, help="patches per mapping iteration (the node's mapping.batch_patches)")
    p.add_argument("--rate", default="max", help="replay pacing: max | recorded | FACTOR (see aceg-replay)")
    p.add_argument("--timeout", type=float, default=60.0, help="longest wait for the node's answer to one image (s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--fresh", action="store_true", help="re-render and rewrite the bags even if they exist")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    # Debugging only: another model file (e.g. a random init before the shipped one exists).
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = REAL if args.data is not None else GENERATED
    args.mapping_frames = args.mapping_frames or defaults["mapping_frames"]
    args.query_frames = args.query_frames or defaults["query_frames"]
    if args.mapping_frames < 3 or args.query_frames < 1 or args.iterations < 1 or args.batch_patches < 64:
        p.error("need --mapping-frames >= 3, --query-frames >= 1, --iterations >= 1, --batch-patches >= 64")
    # Threads that sleep instead of spinning while they wait: on a CPU shared with other work,
    # spinning OpenMP threads slowed inference ~40x here. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from aceg_ros.replay import LocalizerSession, open_query_bag, parse_rate
    from aceg_ros.report import plot_error_cdf, summarize, write_json, write_report

    t_start = time.perf_counter()
    rate = parse_rate(args.rate)
    if not args.model.is_file():
        raise ValueError(f"the pre-trained model {args.model} is missing. The demo uses the checkpoint shipped in "
                         "models/aceg_small.safetensors: update your clone, or make one with aceg-pretrain "
                         "(it writes OUT/model.safetensors) and copy it there")
    if args.model.resolve() != DEFAULT_MODEL.resolve():
        say(f"NOTE: using {args.model}, not the shipped model: accuracy reflects that model only")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    say("step 1/4: mapping and query bags")
    bags, description = prepare_bags(args, out)
    say(description)
    conditions = [name for name in bags if name != "mapping"]
    map_path = out / "map.safetensors"
    if map_path.exists():
        map_path.unlink()  # a map of an earlier run (maybe another model) must never be used

    say("step 2/4: starting the aceg_localizer node (configure: load the model; activate: subscribe)")
    with LocalizerSession({"model_path": str(args.model.resolve()), "map_path": ""}) as session:
        say("step 3/4: mapping over DDS: setting mapping.* parameters, calling /aceg/map_scene")
        t0 = time.perf_counter()
        set_parameters(session, {"mapping.bag": str(bags["mapping"]), "mapping.output": str(map_path),
                                 "mapping.image_topic": "/camera/image_raw",
                                 "mapping.camera_info_topic": "/camera/camera_info",
                                 "mapping.pose_topic": "/camera/pose", "mapping.iterations": args.iterations,
                                 "mapping.batch_patches": args.batch_patches})
        message = map_scene_over_dds(session, timeout_s=3600.0)
        mapping_s = time.perf_counter() - t0
        say(f"map_scene: {message}")

        say(f"step 4/4: replaying the query bags through the node over DDS (rate {args.rate})")
        reports = {}
        for name in conditions:
            qbag = open_query_bag(bags[name], "/camera/image_raw", "/camera/camera_info", "/camera/pose")
            results, wall = session.player.play(qbag, rate, args.timeout, progress=not args.quiet)
            meta = {"tool": "aceg_ros.demo", "condition": name, "mode": "dds", "rate": args.rate,
                    "bag": str(qbag.path), "map": str(map_path), "model": str(args.model),
                    "gt_source": qbag.gt_source,
                    "latency_measures": "image published -> its pose received over DDS (end to end)",
                    "clock": "poses matched by image header stamp (bag time); node on wall time"}
            reports[name] = summarize(results, meta, wall)

    paths = {}
    mapping_xyz = mapping_positions(bags["mapping"])
    for name, rep in reports.items():
        write_json(rep, out / name / "replay.json")
        paths[name] = write_report(rep, out / name, f"{name} queries", mapping_xyz)
    cdf = plot_error_cdf(reports, out / "conditions_cdf.png", "all query conditions")
    wall = time.perf_counter() - t_start
    summary = {"data": description, "model": str(args.model), "mapping_frames": args.mapping_frames,
               "query_frames": args.query_frames, "iterations": args.iterations, "batch_patches": args.batch_patches,
               "mapping_seconds": mapping_s, "map_scene": message, "wall_seconds": wall, "rate": args.rate,
               "conditions": {k: {kk: vv for kk, vv in r.items() if kk != "frames"} for k, r in reports.items()}}
    write_json(summary, out / "summary.json")
    md = ["# ACE-G demo", "", f"- data: {description}", f"- model: {args.model}",
          f"- mapping: {message}", f"- wall time: {wall:.0f} s", "", markdown_table(reports), "",
          f"![all conditions]({cdf.name})", ""]
    md += [f"- {name}: [{paths[name]['markdown'].relative_to(out)}]({paths[name]['markdown'].relative_to(out)})"
           for name in reports]
    (out / "summary.md").write_text("\n".join(md) + "\n")

    print()
    print(f"ACE-G demo: {description}")
    print(f"mapping over DDS: {args.mapping_frames} frames, {mapping_s:.0f} s; replay over DDS at rate {args.rate}")
    print()
    print(text_table(reports))
    print()
    print("5cm/5°, 10cm/10°: % of query frames within both limits (frames without a pose count as wrong); "
          "latency: image published -> pose received.")
    print(f"plots and reports (under {out}):")
    for name, ps in paths.items():
        print(f"  {name}: " + ", ".join(str(ps[k]) for k in ("trajectory", "error_over_time", "error_cdf") if k in ps))
    print(f"  all conditions: {cdf}")
    print(f"  summary: {out / 'summary.md'}, {out / 'summary.json'}")
    print(f"total wall time: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
