"""Shared pieces of the benchmark scripts: run metadata, memory probes, statistics, JSON output.

Not part of the package or the test suite; the scripts import it from their own folder.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = REPO / "models" / "aceg_small.safetensors"
# The held-out real scene (640x480, colour focal 525 px; splits 'mapping' and 'query').
DEFAULT_DATA = REPO.parent / "shared" / "data" / "7scenes-redkitchen-1000"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

# Make `aceg_model` importable when the scripts run with a bare interpreter from anywhere.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_info() -> dict:
    """The commit the numbers belong to, and whether the tree had uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine_tag(device: torch.device) -> str:
    """A file-name-safe tag for the default JSON path: the host name, plus the GPU on CUDA runs."""
    tag = socket.gethostname().split(".")[0]
    if device.type == "cuda":
        tag += "-" + torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    """The CPU's marketing name (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on (absolute times only compare on the same machine)."""
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "opencv_threads": cv2.getNumThreads(),
        "numpy": np.__version__,
        # Thread settings change CPU timings a lot on a shared machine (see scripts/env.sh).
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "device": str(device),
        "device_name": cpu_model(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_memory_bytes=props.total_memory)
    return info


def run_header(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """The common top of every result file."""
    return {
        "benchmark": name,
        "started_at": now(),
        "finished_at": None,  # stays None in a file written by a run that was killed
        "git": git_info(),
        "machine": machine_info(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def default_json(name: str, device: torch.device) -> Path:
    return RESULTS / f"{name}-{machine_tag(device)}.json"


def write_json(path: Path, data: dict) -> None:
    """Write via a temporary file and rename, so a kill mid-write never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def finish_run(json_path: Path, out: dict) -> int:
    """Stamp the end time, write the result file and say where; the script's exit code (0)."""
    out["finished_at"] = now()
    write_json(json_path, out)
    print(f"wrote {json_path}")
    return 0


def _plain(x: Any) -> Any:
    """JSON-ready copy: NaN/inf become null (strict JSON readers such as jq reject NaN), numpy -> Python."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):  # e.g. the mapping report's covariance floor
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


# ---------------------------------------------------------------------------------- memory

def current_rss_bytes() -> int:
    """Resident set size now (second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def maxrss_bytes() -> int:
    """Peak RSS from getrusage (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the next peak is this phase's own.

    Without it ru_maxrss is the peak of the whole process so far, and the second
    method measured in a run would inherit the first's peak. False where not allowed.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Host RSS (and CUDA allocator peak) over one phase: ``with MemoryProbe(device) as m: ...; m.result``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: dict = {}

    def __enter__(self) -> "MemoryProbe":
        self.peak_reset = reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_before = torch.cuda.memory_allocated(self.device)
        self.rss_before = current_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        rss_after = current_rss_bytes()
        # The kernel's counters are synced lazily (tens of KiB), so bound the peak by what was seen.
        peak = max(maxrss_bytes(), self.rss_before, rss_after)
        self.result = {
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": rss_after,
            "rss_growth_bytes": rss_after - self.rss_before,
            # Phase peak when the reset worked, else the process peak so far.
            "peak_rss_bytes": peak,
            "peak_rss_is_phase_peak": self.peak_reset,
            "peak_rss_growth_bytes": peak - self.rss_before if self.peak_reset else None,
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.update(cuda_before_bytes=self.cuda_before,
                               cuda_peak_bytes=torch.cuda.max_memory_allocated(self.device),
                               cuda_peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device))


# ------------------------------------------------------------------------------ statistics

def evenly_spaced(n_total: int, n: int) -> list[int]:
    """``n`` indices spread over ``range(n_total)`` (all of them when ``n >= n_total``)."""
    if n <= 0 or n_total <= 0:
        raise ValueError(f"need n > 0 of n_total > 0, got n={n}, n_total={n_total}")
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, n)})


def summarize_ms(values: Sequence[float]) -> dict:
    """mean / p50 / p95 / min / max of one stage's times; ``n`` says over how many frames."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "min": None, "max": None}
    return {"n": int(len(v)), "mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "min": float(v.min()), "max": float(v.max())}


def ratio(a: Any, b: Any) -> float | None:
    """a / b, or None when either is missing, not a number, or b is 0."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    if not (np.isfinite(a) and np.isfinite(b)) or b == 0:
        return None
    return float(a) / float(b)


def flatten_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a nested dict under a dotted key (``stage_ms.encoder.mean``)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_numbers(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def ratios(num: dict, den: dict) -> dict[str, float | None]:
    """num / den for every numeric figure the two (nested) dicts share, by dotted key."""
    a, b = flatten_numbers(num), flatten_numbers(den)
    return {k: ratio(a[k], b[k]) for k in a if k in b}


def resize_frame_image(image: np.ndarray, intrinsics, width: int, height: int):
    """The image at ``width`` x ``height`` and its intrinsics (unchanged when already that size)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image, intrinsics
    # INTER_AREA to shrink (no aliasing), linear to enlarge.
    interp = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp), intrinsics.resized(width, height)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments every benchmark takes."""
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="dataset folder (redkitchen, 7-Scenes, or a posed folder from aceg-gen-scene)")
    p.add_argument("--kind", default="auto", help="dataset layout (see aceg_model.datasets.open_dataset)")
    p.add_argument("--focal", type=float, default=None,
                   help="colour focal length in px for layouts that take one (redkitchen/7-Scenes: 525); "
                        "posed folders carry their own intrinsics")
    p.add_argument("--mapping-split", default="mapping", help="split of the mapping frames")
    p.add_argument("--query-split", default="query", help="split of the query frames")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pre-trained model (safetensors)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for CPU work (default: torch's own choice)")
    p.add_argument("--batch-patches", type=int, default=None,
                   help="patches per mapping iteration (default: MappingConfig's)")
    p.add_argument("--seed", type=int, default=0, help="mapping seed (same for both methods)")
    p.add_argument("--methods", nargs="+", choices=("aceg", "ace"), default=["aceg", "ace"],
                   help="scene heads to compare (ratios need both aceg and ace)")
    p.add_argument("--json", type=Path, default=None,
                   help="output JSON (default: benchmarks/results/<benchmark>-<machine tag>.json)")


def mapping_config(args: argparse.Namespace, method: str, iterations: int):
    """The ``MappingConfig`` of one benchmark run: the method, budget and seed, and ``--batch-patches``
    where given (else the library's default)."""
    from aceg_model.mapping import MappingConfig

    cfg = MappingConfig(method=method, iterations=iterations, seed=args.seed)
    if args.batch_patches is not None:
        cfg.batch_patches = args.batch_patches
    return cfg


def load_model(path: Path, device: torch.device):
    """The model, or a ValueError saying why not (a checkpoint from an older architecture
    fails inside the config with TypeError/KeyError, which would otherwise be a traceback)."""
    from aceg_model.model import AcegModel

    if not Path(path).is_file():
        raise ValueError(f"model file {path} not found (pass --model)")
    try:
        return AcegModel.load(path, device)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path} does not match this code's model architecture ({e}); "
                         "pre-train a new checkpoint or pass --model") from e


def model_info(model, path: Path) -> dict:
    """Which network the numbers belong to (the checkpoint file changes as pre-training goes on)."""
    from dataclasses import asdict

    return {"path": str(path), "hash": model.model_hash(), "config": asdict(model.config),
            "parameters": sum(p.numel() for p in model.parameters())}


def open_splits(args: argparse.Namespace):
    """(mapping, query) datasets; ``--focal`` only goes to layouts that accept it."""
    from aceg_model.datasets import open_dataset

    kw = {} if args.focal is None else {"focal": args.focal}
    try:
        return (open_dataset(args.data, args.kind, args.mapping_split, **kw),
                open_dataset(args.data, args.kind, args.query_split, **kw))
    except TypeError as e:  # a layout's loader that takes no focal (posed folders carry intrinsics)
        raise ValueError(f"{args.data}: {e}; drop --focal for this layout") from e


def start_run(name: str, args: argparse.Namespace):
    """Threads, device, model and data splits of a benchmark run, plus its JSON path and header;
    ``None`` (after printing why) when an argument or input is bad."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from aceg_model.model import pick_device

    try:
        device = pick_device(args.device)
        model = load_model(args.model, device)
        mapping_ds, query_ds = open_splits(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return None
    out = run_header(name, args, device)
    out["model"] = model_info(model, args.model)
    return device, model, mapping_ds, query_ds, args.json or default_json(name, device), out
