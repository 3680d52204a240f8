"""``aceg-eval``: map a scene from its mapping frames, localize its query frames, report accuracy.

Works on any layout ``aceg_model.datasets.open_dataset`` reads (redkitchen,
7-Scenes, posed folders written by the scene generator, ...). With
``--perturb`` the query images are also evaluated under standard photometric
changes (darker, tinted, blurred) from ``aceg_model.scene.appearance``, to
measure generalization without new data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aceg_model.frames import Frame
from aceg_model.geometry import pose7, pose_error
from aceg_model.landmarks import MAX_SWEEP_SCALE, SweepConfig
from aceg_model.lens import lens_summary, mount_summary
from aceg_model.localizer import Localizer
from aceg_model.map_consistency import consistency_summary
from aceg_model.mapping import (METHODS, CameraPreparation, MappingConfig, SceneMap, map_scene, mapping_config,
                                prepare_cameras, progress_bar)
from aceg_model.metrics import accuracy_summary, covariance_summary, position_consistency
from aceg_model.model import AcegModel, pick_device
from aceg_model.pnp import PnPConfig
from aceg_model.pose_check import pose_check_summary
from aceg_model.pose_refinement import PoseRefinementConfig, refinement_summary
from aceg_model.visits import VisitConfig

PERTURBATIONS = ("darker", "tinted", "blurred")
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "aceg_small.safetensors"


def perturb(image: np.ndarray, name: str, seed: int) -> np.ndarray:
    """The query image under a named photometric change (same change for every method)."""
    from aceg_model.scene.appearance import PRESETS

    return PRESETS[name].apply(image, np.random.default_rng(seed))


def evaluate_queries(localizer: Localizer, queries, perturbation: str | None = None, desc: str = "localize") -> dict:
    """Localize every query frame; metrics plus one record per frame."""
    t_err, r_err, times, records = [], [], [], []
    for i in tqdm(range(len(queries)), desc=desc, unit="frame", leave=False):
        frame = queries[i]
        image = frame.image if perturbation is None else perturb(frame.image, perturbation, seed=i)
        res = localizer.localize(image, frame.intrinsics)
        times.append(res.timings_ms["total"])
        sigma_cm = nees = None
        if res.success:
            dt, dr = pose_error(res.T_world_cam, frame.T_world_cam)
            t_err.append(dt), r_err.append(dr)
            sigma_cm, nees = position_consistency(res.T_world_cam, res.covariance_66, frame.T_world_cam)
        else:
            t_err.append(None), r_err.append(None)
        records.append({"name": frame.name, "success": res.success, "reason": res.reason,
                        "pose": pose7(res.T_world_cam) if res.success else None,  # x y z qx qy qz qw
                        "n_inliers": res.n_inliers, "trans_err_cm": None if t_err[-1] is None else 100 * t_err[-1],
                        "rot_err_deg": r_err[-1], "resolve_support": None if not res.success else res.resolve_support,
                        "first_solve_kept": res.first_solve_kept,
                        "sigma_trans_cm": sigma_cm, "nees_trans": nees, "ms": res.timings_ms})
    out = accuracy_summary(t_err, r_err)
    out["localize_ms_mean"] = float(np.mean(times)) if times else float("nan")
    out.update(covariance_summary([r["nees_trans"] for r in records]))
    # Frames answered with the first solve's pose because the re-solved one left its evidence.
    out["n_first_solve_kept"] = sum(r["first_solve_kept"] for r in records)
    out["frames"] = records
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Map with the mapping frames, localize the query frames, write JSON.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="dataset folder (redkitchen, 7-Scenes or posed-folder layout)")
    p.add_argument("--kind", default="auto", help="dataset layout (see aceg_model.datasets.open_dataset)")
    p.add_argument("--mapping-list", default="mapping", help="split name or list file of mapping frames")
    p.add_argument("--query-list", default="query", help="split name or list file of query frames")
    p.add_argument("--focal", type=float, default=None, help="colour focal length in px (redkitchen/7-Scenes: 525)")
    p.add_argument("--intrinsics", type=Path, default=None, help="3x3 K text file overriding --focal")
    p.add_argument("--method", choices=METHODS, default="aceg", help="ACE-G map codes or the ACE-style MLP baseline")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pre-trained model (safetensors)")
    p.add_argument("--map", type=Path, default=None, help="reuse this map file instead of mapping")
    p.add_argument("--save-map", type=Path, default=None, help="write the map made here to this file")
    p.add_argument("--iterations", type=int, default=MappingConfig.iterations, help="mapping iterations")
    p.add_argument("--batch-patches", type=int, default=MappingConfig.batch_patches, help="patches per mapping iteration")
    p.add_argument("--sweep-scale", type=int, default=SweepConfig.scale,
                   help=f"the landmark plane sweep compares images encoded at this multiple of the model's resolution "
                        f"(1-{MAX_SWEEP_SCALE})")
    p.add_argument("--fixed-depth-seeds", action="store_true",
                   help="seed every landmark at the loss's target depth instead of plane-sweeping (ablation)")
    p.add_argument("--no-photo-depth", action="store_true",
                   help="keep the plane sweep's landmark depths (no NCC sharpening on the raw pixels; ablation)")
    p.add_argument("--no-lens-estimate", action="store_true",
                   help="treat the camera as pinhole (do not estimate and remove its radial lens distortion, nor "
                        "its mount; ablation)")
    p.add_argument("--no-mount-estimate", action="store_true",
                   help="take the poses as the camera's (do not estimate its mount on the pose frame; ablation)")
    p.add_argument("--no-pose-check", action="store_true",
                   help="do not compare the mapping poses with the images (pairs a moment apart; a report only)")
    p.add_argument("--refine-poses", action=argparse.BooleanOptionalAction, default=PoseRefinementConfig.enabled,
                   help="correct the mapping poses from the mapping images before mapping (an epipolar bundle "
                        "adjustment of SIFT-matched image pairs)")
    p.add_argument("--visit-window", type=float, default=VisitConfig.window_s,
                   help="seconds of the mapping sequence a landmark belongs to around its seed image; "
                        "0 = off (ablation)")
    p.add_argument("--top-k", type=int, default=PnPConfig.top_k,
                   help="PnP prefilter: keep the k most certain correspondences; 0 = all")
    p.add_argument("--no-refine-pixels", action="store_true",
                   help="use the patch centres as the correspondences' pixels (no sub-patch refinement)")
    p.add_argument("--refine-bf16", action="store_true",
                   help="the refinement's fine encoding under bfloat16 on a CPU (faster where the CPU has native "
                        "bf16; see PnPConfig.refine_bf16)")
    p.add_argument("--no-photometric", action="store_true",
                   help="keep the poses from the patch correspondences (no photometric refinement on the landmarks' "
                        "grey windows)")
    p.add_argument("--seed-ray-sigma", type=float, default=PnPConfig.seed_ray_depth_sigma,
                   help="depth uncertainty along the seed rays in the final fit, as a fraction of the depth "
                        "(0 = trust landmark depths like their rays; see aceg_model.seed_rays)")
    p.add_argument("--resolve-min-support", type=float, default=PnPConfig.resolve_min_support,
                   help="keep the accepting solve's pose where the re-solved one explains less than this share "
                        "of its inliers (0 = off; see PnPConfig.resolve_min_support)")
    p.add_argument("--no-map-floor", action="store_true",
                   help="report the covariance of the inliers alone, without the map's floor (how its visits "
                        "disagree; see aceg_model.map_consistency)")
    p.add_argument("--max-query", type=int, default=None, help="evaluate only every n-th query so at most this many")
    p.add_argument("--perturb", nargs="*", choices=PERTURBATIONS, default=None,
                   help="also evaluate under these photometric changes (none given: all)")
    p.add_argument("--baseline", action="store_true",
                   help="also map the same frames with the ACE-style MLP head on the same encoder (every "
                        "correspondence, the same iterations) and report both side by side; its results go "
                        "under 'baseline' in the JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", type=Path, required=True, help="output JSON path")
    args = p.parse_args(argv)
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0 (0 = all correspondences), got {args.top_k}")
    if not 1 <= args.sweep_scale <= MAX_SWEEP_SCALE:
        p.error(f"--sweep-scale must be in 1..{MAX_SWEEP_SCALE}, got {args.sweep_scale}")
    if not 0 <= args.resolve_min_support <= 1:
        p.error(f"--resolve-min-support must be in [0, 1] (0 = off), got {args.resolve_min_support}")
    if args.baseline and args.method == "ace":
        p.error("--baseline compares ACE-G against the ACE-style head; use it with --method aceg")
    if not args.visit_window >= 0:
        p.error(f"--visit-window must be >= 0 s (0 = off), got {args.visit_window}")

    from aceg_model.datasets import open_dataset

    try:
        device = pick_device(args.device)
        kw = {}
        if args.focal is not None:
            kw["focal"] = args.focal
        if args.intrinsics is not None:
            kw["intrinsics_file"] = args.intrinsics
        split = lambda s: Path(s) if Path(s).is_file() else s  # noqa: E731
        mapping = open_dataset(args.data, args.kind, split(args.mapping_list), **kw)
        queries = open_dataset(args.data, args.kind, split(args.query_list), **kw)
        model = AcegModel.load(args.model, device) if args.model.exists() else None
        if model is None:
            raise ValueError(f"model file {args.model} not found; pre-train one with aceg-pretrain or pass --model")
    except (ValueError, FileNotFoundError) as e:
        print(f"aceg-eval: {e}", file=sys.stderr)
        return 2
    if args.max_query and len(queries) > args.max_query:
        step = int(np.ceil(len(queries) / args.max_query))
        queries = [queries[i] for i in range(0, len(queries), step)]

    pnp = PnPConfig(top_k=args.top_k or None, refine_pixels=not args.no_refine_pixels, refine_bf16=args.refine_bf16,
                    photometric_refinement=not args.no_photometric, seed_ray_depth_sigma=args.seed_ray_sigma,
                    resolve_min_support=args.resolve_min_support, map_floor=not args.no_map_floor)
    result, header, cameras = run_method(args, model, device, mapping, queries, args.method, pnp, args.map,
                                         args.save_map)
    if args.baseline:
        # The ACE-style head keeps every correspondence: its uncertainties do not rank them
        # (models/README.md), and a top-k would only take inliers away from it. It maps from the
        # lens and the corrected poses ACE-G's mapping found (the same frames, the same settings),
        # so both heads see the same poses; with --map it finds them itself.
        result["baseline"], base_header, _ = run_method(args, model, device, mapping, queries, "ace",
                                                        dataclasses.replace(pnp, top_k=None), None, None, cameras)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print_result(result, header)
    if args.baseline:
        print_result(result["baseline"], base_header)
        print_side_by_side(result)
    return 0


def run_method(args: argparse.Namespace, model: AcegModel, device: torch.device, mapping: Sequence[Frame],
               queries: Sequence[Frame], method: str, pnp: PnPConfig, map_file: Path | None, save_map: Path | None,
               cameras: CameraPreparation | None = None) -> tuple[dict, list[str], CameraPreparation | None]:
    """Map (or load ``map_file``) with one method, then localize every query, perturbed as asked.
    A map made here is written to ``save_map`` where given. ``cameras``: the lens and corrected
    poses another method's mapping of the same frames found, used instead of finding them again.

    Returns the JSON result, the lines that introduce it in the printout, and the camera
    preparation mapping used (None where the map was loaded)."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pose_check, lens_estimate, consistency, refinement = None, None, None, None
    shared = cameras is not None
    if map_file:
        scene_map = SceneMap.load(map_file, model)
        mapping_seconds = 0.0
    else:
        progress, bar = progress_bar(args.iterations, f"mapping ({method})")
        config = mapping_config(method=method, iterations=args.iterations, batch_patches=args.batch_patches,
                                sweep_seeds=not args.fixed_depth_seeds, sweep_scale=args.sweep_scale,
                                photo_depth=not args.no_photo_depth, estimate_lens=not args.no_lens_estimate,
                                estimate_mount=not args.no_mount_estimate,
                                visit_window_s=args.visit_window, check_poses=not args.no_pose_check,
                                refine_poses=args.refine_poses)
        if cameras is None:
            cameras = prepare_cameras(mapping, config, progress)
        scene_map, report = map_scene(model, mapping, config, progress, pnp, cameras)
        bar.close()
        pose_check, lens_estimate, consistency = report.pose_check, report.lens, report.consistency
        refinement = report.pose_refinement
        # A shared preparation's time counts towards this method's mapping as well.
        mapping_seconds = time.perf_counter() - t0 + (cameras.seconds if shared else 0.0)
        if save_map:
            scene_map.save(save_map)
    localizer = Localizer(model, scene_map, pnp)
    result = {"method": method, "data": str(args.data), "model": str(args.model), "device": str(device),
              "n_mapping": len(mapping), "mapping_seconds": mapping_seconds,
              "shared_camera_preparation": shared,
              "top_k": pnp.top_k,
              "refine_pixels": localizer.refines_pixels, "photometric": localizer.refines_photometrically,
              "lens": None if scene_map.lens is None else scene_map.lens.to_meta(),
              "lens_estimate": None if lens_estimate is None else lens_summary(lens_estimate),
              "pose_check": None if pose_check is None else pose_check.to_json(),
              "pose_refinement": None if refinement is None else refinement.to_json(),
              "consistency": None if consistency is None else consistency.to_json(),
              "map_floor": localizer.adds_map_floor,
              "visit_window_s": None if scene_map.views is None else scene_map.views.window_s,
              "solve_in_visit": localizer.solves_in_visit,
              "seed_ray_depth_sigma": localizer.pnp.seed_ray_depth_sigma if localizer.refines_along_seed_rays else 0.0,
              "resolve_min_support": localizer.pnp.resolve_min_support}
    result.update(evaluate_queries(localizer, queries, desc=f"localize ({method})"))
    if args.perturb is not None:
        result["perturbed"] = {}
        for name in args.perturb or PERTURBATIONS:
            result["perturbed"][name] = evaluate_queries(localizer, queries, name, desc=f"{name} ({method})")
    header = [f"{method}: mapping {mapping_seconds:.0f} s, {len(queries)} queries, {describe(localizer, scene_map)}"]
    if pose_check is not None and not shared:
        header.append(f"  {pose_check_summary(pose_check)}")
    if refinement is not None and not shared:
        header.append(f"  {refinement_summary(refinement)}")
    if not map_file:
        header.append(f"  visits: {consistency_summary(consistency)}")
    if shared:
        header.append(f"  lens and poses: ACE-G's ({cameras.seconds:.0f} s, counted in the mapping time above)")
    return result, header, cameras


def describe(localizer: Localizer, scene_map: SceneMap) -> str:
    """One line on how the poses were made: the localizer's steps and the map's camera."""
    refined = "pixels refined within their patches" if localizer.refines_pixels else "patch-centre pixels"
    if localizer.refines_photometrically:
        refined += ", poses refined on the landmarks' grey windows"
    if localizer.solves_in_visit:
        refined += f", poses solved again within a {scene_map.views.window_s:g} s mapping visit"
    if localizer.refines_along_seed_rays:
        refined += f", landmark depths {100 * localizer.pnp.seed_ray_depth_sigma:g} % uncertain in the final fit"
    # The guard acts on re-solves; a head without landmarks (the MLP baseline) makes none.
    if localizer.pnp.resolve_min_support > 0 and (localizer.solves_in_visit or localizer.refines_photometrically):
        refined += (f", the first solve's pose kept where the re-solved one explains less than "
                    f"{100 * localizer.pnp.resolve_min_support:g} % of its inliers")
    lens = scene_map.lens
    lens_text = ("pinhole camera" if lens is None or lens.distortion.is_zero else
                 f"lens distortion k1={lens.distortion.k1:.3f} k2={lens.distortion.k2:.3f} removed")
    if lens is not None and not lens.mount.is_identity:
        lens_text += f", {mount_summary(lens.mount)} corrected"
    return f"{refined}, {lens_text}"


def conditions(result: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for the recorded queries and each photometric change."""
    return [("as recorded", result)] + list(result.get("perturbed", {}).items())


def print_result(result: dict, header: list[str]) -> None:
    """One method's header lines, then a line per condition."""
    print("\n".join(header))
    for name, r in conditions(result):
        print(f"  {name:12s} 5cm/5deg {r['pct_5cm_5deg']:5.1f}%  10cm/10deg {r['pct_10cm_10deg']:5.1f}%  "
              f"median {r['median_trans_cm']:.1f} cm / {r['median_rot_deg']:.2f} deg  failed {r['n_failed']}  "
              f"first solve kept {r['n_first_solve_kept']}  "
              f"position error within the covariance's 95 % bound {r['pct_nees_trans_within_95']:.0f}%  "
              f"{r['localize_ms_mean']:.0f} ms/frame")


def print_side_by_side(result: dict) -> None:
    """The issue's comparison: each method's 5cm/5deg / 10cm/10deg rates per condition."""
    base = result["baseline"]
    print(f"\n  {'':12s} {result['method']:>16s} {base['method'] + ' (MLP head)':>18s}")
    for (name, r), (_, b) in zip(conditions(result), conditions(base)):
        print(f"  {name:12s} {r['pct_5cm_5deg']:6.1f} / {r['pct_10cm_10deg']:5.1f}% "
              f"{b['pct_5cm_5deg']:8.1f} / {b['pct_10cm_10deg']:5.1f}%")


if __name__ == "__main__":
    raise SystemExit(main())
