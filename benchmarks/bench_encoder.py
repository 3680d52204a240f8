"""Encoder latency for one image, split into its parts, under several backend settings.

On the H200 the localizer's encoder stage took as long as on the 2-core CPU (12 ms,
benchmarks/README.md), which the network's size does not explain. This times the
parts of that stage one by one for a 640x480 frame: the image's preparation on the
CPU (grey, resize), the copy to the device, and the network's forward pass, at the
working height (240) and the fine height (720, the pixel refinement's), with
``--settings`` that change how the backend runs the convolutions. Each setting's
features are compared with the default's, so a faster one that changes them shows.

    python benchmarks/bench_encoder.py --device cuda --iterations 100
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from _common import finish_run, load_model, model_info, run_header, default_json, summarize_ms, DEFAULT_MODEL

from aceg_model.frames import Intrinsics
from aceg_model.model import pick_device, prepare_image

NAME = "bench_encoder"
SETTINGS = ("default", "cudnn_benchmark", "channels_last", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (safetensors)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU work")
    p.add_argument("--heights", type=int, nargs="+", default=[240, 720], help="encoder input heights (px)")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                   help="backend settings to time (cudnn_benchmark is CUDA-only and skipped on a CPU)")
    p.add_argument("--iterations", type=int, default=50, help="timed repetitions per height and setting")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions before them")
    p.add_argument("--json", default=None, help="output JSON (default: benchmarks/results/<benchmark>-<machine tag>.json)")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or min(args.heights) < 8:
        p.error("need --iterations >= 1, --warmup >= 0 and heights >= 8")
    return args


@contextmanager
def backend(setting: str, model, device: torch.device):
    """The encoder run under ``setting``; everything is put back afterwards."""
    bench = torch.backends.cudnn.benchmark
    if setting == "cudnn_benchmark":
        torch.backends.cudnn.benchmark = True
    if setting == "channels_last":
        model.encoder.to(memory_format=torch.channels_last)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting == "bf16"):
            yield
    finally:
        torch.backends.cudnn.benchmark = bench
        if setting == "channels_last":
            model.encoder.to(memory_format=torch.contiguous_format)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_parts(model, image: np.ndarray, K: Intrinsics, height: int, setting: str, device: torch.device,
               iterations: int, warmup: int) -> tuple[dict, torch.Tensor]:
    """ms per part over ``iterations`` runs, and the last run's features (float32, on the CPU)."""
    parts: dict[str, list[float]] = {"prepare": [], "to_device": [], "forward": [], "total": []}
    feats = None
    with backend(setting, model, device):
        for i in range(warmup + iterations):
            sync(device)
            t0 = time.perf_counter()
            image_1HW, _ = prepare_image(image, K, height)
            t1 = time.perf_counter()
            x = image_1HW.unsqueeze(0).to(device)
            if setting == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            sync(device)
            t2 = time.perf_counter()
            feats = model.encoder(x)
            sync(device)
            t3 = time.perf_counter()
            if i >= warmup:
                for k, v in (("prepare", t1 - t0), ("to_device", t2 - t1), ("forward", t3 - t2), ("total", t3 - t0)):
                    parts[k].append(1e3 * v)
    return {k: summarize_ms(v) for k, v in parts.items()}, feats.float().cpu()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        model = load_model(args.model, device).eval()
    except ValueError as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        return 2
    out = run_header(NAME, args, device)
    out["model"] = model_info(model, args.model)
    # Content does not change a convolution's cost; a fixed random frame keeps runs comparable.
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    K = Intrinsics(525.0, 525.0, 319.5, 239.5, 640, 480)
    settings = [s for s in args.settings if s != "cudnn_benchmark" or device.type == "cuda"]
    out["runs"] = {}
    for height in args.heights:
        reference = None
        for setting in settings:
            stages, feats = time_parts(model, image, K, height, setting, device, args.iterations, args.warmup)
            run = {"height": height, "setting": setting, "stage_ms": stages}
            if reference is None:
                reference = feats
            else:  # how far the setting moves the features from the first one's
                cos = torch.nn.functional.cosine_similarity(feats.flatten(2), reference.flatten(2), dim=1)
                run["feature_cosine_min"] = float(cos.min())
                run["feature_cosine_mean"] = float(cos.mean())
            out["runs"][f"{height}/{setting}"] = run
            print(f"h={height:4d} {setting:16s} " + "  ".join(
                f"{k} {v['mean']:7.2f} ms" for k, v in stages.items()), flush=True)
    return finish_run(default_json(NAME, device) if args.json is None else Path(args.json), out)


if __name__ == "__main__":
    raise SystemExit(main())
