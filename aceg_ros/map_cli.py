"""``aceg-map``: optimize a map code from a bag (image + camera_info + poses) or a posed-image folder.

The same work as the node's ``/aceg/map_scene`` service, without a running node.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from aceg_model.landmarks import MAX_SWEEP_SCALE, SweepConfig
from aceg_model.lens import lens_summary
from aceg_model.mapping import METHODS, MappingConfig, map_scene, mapping_config, progress_bar
from aceg_model.model import AcegModel, pick_device
from aceg_model.map_consistency import consistency_summary
from aceg_model.pose_check import pose_check_summary
from aceg_model.pose_refinement import PoseRefinementConfig, refinement_summary
from aceg_model.visits import VisitConfig

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"


def load_frames(args: argparse.Namespace):
    """Frames from --bag (through the bag reader) or --data (through the dataset loaders)."""
    if args.bag:
        from aceg_ros.bag_io import read_bag_frames

        frames, report = read_bag_frames(args.bag, args.image_topic, args.camera_info_topic,
                                         pose_topic=args.pose_topic or None, tf_parent=args.tf_parent,
                                         max_pose_gap=args.max_pose_gap)
        print(f"bag: {report}", file=sys.stderr)
        return frames
    from aceg_model.datasets import open_dataset

    return open_dataset(args.data, args.kind, args.split)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Map a scene: optimize ACE-G map codes (or the ACE-style baseline head) "
                                "from posed RGB images.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bag", type=Path, help="rosbag2 folder (sqlite3 or mcap)")
    src.add_argument("--data", type=Path, help="posed-image folder (any layout aceg_model.datasets reads)")
    p.add_argument("--out", type=Path, required=True, help="map file to write (safetensors, written atomically)")
    p.add_argument("--image-topic", default="/camera/image_raw", help="image topic in the bag")
    p.add_argument("--camera-info-topic", default="/camera/camera_info", help="camera_info topic in the bag")
    p.add_argument("--pose-topic", default="/camera/pose",
                   help="pose topic (PoseStamped, PoseWithCovarianceStamped or Odometry); '' to use /tf")
    p.add_argument("--tf-parent", default="map", help="map frame for /tf poses")
    p.add_argument("--max-pose-gap", type=float, default=0.05, help="max time from an image to a pose sample (s)")
    p.add_argument("--kind", default="auto", help="dataset layout for --data")
    p.add_argument("--split", default=None, help="dataset split for --data (e.g. mapping)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pre-trained model (safetensors)")
    p.add_argument("--method", choices=METHODS, default="aceg", help="map codes (aceg) or MLP baseline (ace)")
    p.add_argument("--iterations", type=int, default=MappingConfig.iterations, help="optimization iterations")
    p.add_argument("--sweep-scale", type=int, default=SweepConfig.scale,
                   help="the landmark plane sweep compares images encoded at this multiple of the model's resolution "
                        f"(1-{MAX_SWEEP_SCALE}; encoding time and memory grow with scale^2)")
    p.add_argument("--no-photo-depth", action="store_true",
                   help="keep the plane sweep's landmark depths (no NCC sharpening on the raw pixels)")
    p.add_argument("--no-lens-estimate", action="store_true",
                   help="treat the camera as pinhole: do not estimate its radial lens distortion (nor its mount) "
                        "from the posed images")
    p.add_argument("--no-mount-estimate", action="store_true",
                   help="take the poses as the camera's: do not estimate a fixed turn and offset of the camera from "
                        "the frame the poses describe")
    p.add_argument("--no-pose-check", action="store_true",
                   help="do not compare the mapping poses with the images (pairs a moment apart; a report only)")
    p.add_argument("--refine-poses", action=argparse.BooleanOptionalAction, default=PoseRefinementConfig.enabled,
                   help="correct the mapping poses from the mapping images before mapping (an epipolar bundle "
                        "adjustment of SIFT-matched image pairs; for tracked poses a few mm and 0.1 deg off)")
    p.add_argument("--visit-window", type=float, default=VisitConfig.window_s,
                   help="seconds of the mapping sequence around each landmark's seed image that it belongs to, so "
                        "drift between two visits of a place does not blur it; 0 = off")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    if args.iterations <= 0:
        p.error("--iterations must be > 0")
    if not 1 <= args.sweep_scale <= MAX_SWEEP_SCALE:
        p.error(f"--sweep-scale must be in 1..{MAX_SWEEP_SCALE}")
    if not args.visit_window >= 0:
        p.error(f"--visit-window must be >= 0 s (0 = off), got {args.visit_window}")
    try:
        model = AcegModel.load(args.model, pick_device(args.device))
        frames = load_frames(args)
        progress, bar = progress_bar(args.iterations, f"mapping {len(frames)} frames")
        t0 = time.perf_counter()
        config = mapping_config(method=args.method, iterations=args.iterations, sweep_scale=args.sweep_scale,
                                photo_depth=not args.no_photo_depth, estimate_lens=not args.no_lens_estimate,
                                estimate_mount=not args.no_mount_estimate,
                                visit_window_s=args.visit_window, check_poses=not args.no_pose_check,
                                refine_poses=args.refine_poses)
        scene_map, report = map_scene(model, frames, config, progress)
        bar.close()
        scene_map.save(args.out)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"aceg-map: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {report.n_frames} frames, {report.iterations} iterations, final loss "
          f"{report.final_loss:.3f}, median reprojection {report.final_median_px:.1f} px, "
          f"{time.perf_counter() - t0:.0f} s")
    if report.lens is not None:
        print(f"lens: {lens_summary(report.lens)}")
    if report.pose_check is not None:
        print(f"poses: {pose_check_summary(report.pose_check)}")
    if report.pose_refinement is not None:
        print(f"poses: {refinement_summary(report.pose_refinement)}")
    print(f"visits: {consistency_summary(report.consistency)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
