"""aceg-make-bag: turn a posed-image dataset into a rosbag2 bag the node and mapper replay.

    aceg-make-bag --data ../shared/data/7scenes_fixture --out /tmp/fixture_bag
    aceg-make-bag --data DIR --kind redkitchen --split mapping --compressed png --rate 30 --out BAG

Writes images, camera_info, a PoseStamped topic and /tf (see :mod:`aceg_ros.bag_io`),
and prints a one-line summary. Needs no ROS install.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from aceg_model.frames import Frame
from aceg_ros import bag_io

# CLI layout names -> aceg_model.datasets layout names ("folder" is the short spelling).
KINDS = {"auto": "auto", "7scenes": "7scenes", "redkitchen": "redkitchen", "folder": "posed-folder",
         "posed-folder": "posed-folder", "kitti": "kitti", "strecha": "strecha"}
FOCAL_KINDS = ("7scenes", "redkitchen")  # the layouts whose colour focal length is a convention, not a file


class _Stamped(Sequence[Frame]):
    """The first ``count`` frames of a lazy dataset, optionally re-stamped; still lazy."""

    def __init__(self, frames: Sequence[Frame], count: int, rate_hz: float | None, offset_s: float) -> None:
        self.frames, self.count, self.rate_hz, self.offset_s = frames, count, rate_hz, offset_s

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Frame:  # type: ignore[override] - ints only, which is all write_bag uses
        if not 0 <= i < self.count:
            raise IndexError(i)
        frame = self.frames[i]
        stamp = i / self.rate_hz if self.rate_hz else frame.stamp
        return replace(frame, stamp=self.offset_s + stamp)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one and the help text does not already explain it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aceg-make-bag", description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter)
    src = p.add_argument_group("source dataset")
    src.add_argument("--data", type=Path, required=True, metavar="DIR", help="posed-image dataset folder")
    src.add_argument("--kind", choices=list(KINDS), default="auto",
                     help="dataset layout ('auto' detects it; 'folder' is a posed folder written by aceg_model)")
    src.add_argument("--split", default=None, help="dataset split (7scenes: train|test; redkitchen: "
                     "mapping|query; folder: any <split>.txt); default: all frames")
    src.add_argument("--focal", type=_positive(float), default=None, metavar="PX",
                     help="colour focal length in pixels for 7scenes/redkitchen (default: the loader's, 525 px)")
    src.add_argument("--max-frames", type=_positive(int), default=None, metavar="N",
                     help="write only the first N frames (default: all)")
    src.add_argument("--rate", type=_positive(float), default=None, metavar="HZ",
                     help="re-stamp frame i at i / HZ seconds (for datasets without real timing; "
                          "default: keep the dataset's stamps)")
    src.add_argument("--time-offset", type=float, default=0.0, metavar="SEC",
                     help="seconds added to every stamp (ROS tools read time 0 as 'latest')")

    out = p.add_argument_group("output bag")
    out.add_argument("--out", type=Path, required=True, metavar="BAG",
                     help="bag folder to create (must not exist)")
    out.add_argument("--storage", choices=list(bag_io.STORAGES), default=bag_io.DEFAULT_STORAGE,
                     help="rosbag2 storage plugin")
    out.add_argument("--compressed", choices=["none", "png", "jpeg"], default="none",
                     help="write sensor_msgs/CompressedImage (png: lossless) instead of raw sensor_msgs/Image")
    out.add_argument("--jpeg-quality", type=int, default=bag_io.DEFAULT_JPEG_QUALITY, metavar="PERCENT",
                     help="JPEG quality 0-100 with --compressed jpeg")
    out.add_argument("--image-topic", default=None,
                     help=f"image topic (default: {bag_io.DEFAULT_IMAGE_TOPIC}, "
                          f"+{bag_io.COMPRESSED_SUFFIX} when compressed)")
    out.add_argument("--camera-info-topic", default=bag_io.DEFAULT_CAMERA_INFO_TOPIC, help="CameraInfo topic")
    out.add_argument("--pose-topic", default=bag_io.DEFAULT_POSE_TOPIC,
                     help="geometry_msgs/PoseStamped topic of the camera pose in the map frame ('' for none)")
    out.add_argument("--no-tf", action="store_true", help="do not write the poses to /tf")
    out.add_argument("--map-frame", default=bag_io.DEFAULT_MAP_FRAME, help="TF frame of the scene")
    out.add_argument("--camera-frame", default=bag_io.DEFAULT_CAMERA_FRAME,
                     help="TF frame of the camera (OpenCV optical frame: x right, y down, z forward)")
    out.add_argument("--odom-frame", default=None,
                     help="write TF as map -> ODOM (identity, on /tf_static) -> camera instead of map -> camera")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def make_bag(args: argparse.Namespace) -> bag_io.BagWriteSummary:
    """Open the dataset named by ``args`` and write it as a bag; ``ValueError`` on bad input."""
    # Imported here: the dataset loaders are heavier than this CLI's argument handling.
    from aceg_model.datasets import detect_layout, open_dataset

    kind = KINDS[args.kind]
    loader_kw = {}
    if args.focal is not None:
        layout = detect_layout(args.data) if kind == "auto" and args.data.is_dir() else kind
        if layout not in FOCAL_KINDS:
            raise ValueError(f"--focal applies to {' and '.join(FOCAL_KINDS)} datasets; {args.data} is "
                             f"{layout or 'of no known layout'} (its intrinsics come from its files)")
        loader_kw["focal"] = args.focal
    if args.compressed == "jpeg" and not 0 <= args.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be 0-100, got {args.jpeg_quality}")
    dataset = open_dataset(args.data, kind, args.split, **loader_kw)
    count = len(dataset) if args.max_frames is None else min(args.max_frames, len(dataset))
    if count == 0:
        raise ValueError(f"{args.data} (split {args.split}) has no frames")
    frames = _Stamped(dataset, count, args.rate, args.time_offset)
    return bag_io.write_bag(
        frames, args.out, args.storage, image_topic=args.image_topic, compressed=args.compressed != "none",
        compression=args.compressed if args.compressed != "none" else "png", jpeg_quality=args.jpeg_quality,
        camera_info_topic=args.camera_info_topic, pose_topic=args.pose_topic or None, tf=not args.no_tf,
        map_frame=args.map_frame, camera_frame=args.camera_frame, odom_frame=args.odom_frame or None,
        progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aceg-make-bag``; returns the exit status (0 ok, 1 bad input, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        summary = make_bag(args)
    except (ValueError, OSError) as exc:
        print(f"aceg-make-bag: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"aceg-make-bag: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
