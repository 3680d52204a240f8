"""The one place that reads and writes model and map files.

Format: a plain safetensors file (8-byte little-endian header length, a JSON
header, raw tensor bytes) whose ``__metadata__`` holds one JSON string under
the key ``"aceg"``::

    {"kind": "aceg-map" | "aceg-model", "format_version": 1, "meta": {...}}

``meta`` is the caller's JSON-serializable dict (a map records e.g. the
``model_hash`` of the model it was made with, the intrinsics convention and
the scene frame). Nothing here unpickles: torch.load / pickle files are
recognised and refused. Everything is checked before it is trusted: the
header length is bounded before it is read, offsets are validated, and
tensor names, shapes, dtypes, values and metadata are checked on load.
Writes are atomic: a reader sees the old file or the new one, never a part.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Literal

import safetensors.torch
import torch

FORMAT_VERSION = 1
Kind = Literal["aceg-map", "aceg-model"]
KINDS: tuple[str, ...] = ("aceg-map", "aceg-model")
META_KEY = "aceg"
MAX_HEADER_BYTES = 16 * 2**20  # a JSON header of 16 MiB already lists ~100k tensors
DEFAULT_MAX_BYTES = 2 * 2**30  # models may grow; callers pass a tighter bound for maps

# safetensors dtype names -> torch dtype (the ones this project writes and reads).
_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


class FileFormatError(ValueError):
    """A model or map file that is not what the caller asked for, or not safe to load."""


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 hex digest over the tensors' names, dtypes, shapes and bytes.

    Independent of dict order, device and memory layout (contiguity), so a
    map can record exactly which model weights it was made with.
    """
    h = hashlib.sha256(b"aceg-tensor-hash-v1")

    def field(data: bytes) -> None:  # length-prefixed, so fields cannot run into each other
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        field(name.encode())
        field(str(t.dtype).encode())
        field(json.dumps(list(t.shape)).encode())
        field(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _nonfinite_count(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, kind: Kind) -> None:
    """Write ``tensors`` and ``meta`` to ``path`` atomically (see the module docstring).

    Refuses (ValueError) names that are not strings, unsupported dtypes,
    non-finite values, and ``meta`` that is not strict JSON (no NaN).
    Tensors are moved to the CPU; their storage must not be shared.
    """
    _check_kind(kind)
    cpu_tensors = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors must map str to torch.Tensor, got {name!r}: {type(t).__name__}")
        if t.dtype not in _DTYPES.values():
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} not supported ({sorted(map(str, _DTYPES.values()))})")
        if (bad := _nonfinite_count(t)) > 0:
            raise ValueError(f"tensor {name!r} has {bad} non-finite values (NaN/inf); refusing to save it")
        cpu_tensors[name] = t.detach().cpu().contiguous()
    try:
        meta_json = json.dumps({"kind": kind, "format_version": FORMAT_VERSION, "meta": meta},
                               allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta must be JSON-serializable without NaN/inf: {exc}") from exc
    try:
        blob = safetensors.torch.save(cpu_tensors, metadata={META_KEY: meta_json})
    except Exception as exc:  # e.g. tensors sharing storage
        raise ValueError(f"cannot serialize tensors: {exc}") from exc
    atomic_write_bytes(Path(path), blob)


def atomic_write_bytes(path: Path, blob: bytes) -> None:
    """Write via a temp file in the same directory + fsync + os.replace; the temp is removed on error."""
    directory = path.parent
    # Keep an existing file's permissions; mkstemp's 0600 would hide a new map from other users.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable (not possible on every platform).
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _refuse_pickle(path: Path, prefix: bytes) -> None:
    # torch.save writes a zip archive (PK\x03\x04) or, in its legacy format, a raw pickle (\x80 + protocol).
    if prefix.startswith(b"PK\x03\x04") or (len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5):
        raise FileFormatError(
            f"{path}: this is a torch.save / pickle file, not safetensors; refusing to load it "
            "(unpickling can run arbitrary code). Re-export it with aceg_model.safe_files.save_tensors."
        )


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise FileFormatError(f"duplicate keys in header: {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _naturals(xs: object) -> bool:
    return isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)


def _parse_header(path: Path, header_bytes: bytes, data_len: int) -> tuple[dict, dict]:
    """Validated (tensor entries, __metadata__) of a safetensors header."""
    bad = f"{path}: tampered or corrupt header"
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{bad}: not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise FileFormatError(f"{bad}: expected a JSON object, got {type(header).__name__}")
    file_meta = header.pop("__metadata__", {})
    if not isinstance(file_meta, dict) or not all(isinstance(v, str) for v in file_meta.values()):
        raise FileFormatError(f"{bad}: __metadata__ must map str to str")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FileFormatError(f"{bad}: entry {name!r} must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise FileFormatError(f"{bad}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise FileFormatError(f"{bad}: tensor {name!r} has invalid shape {shape!r} or offsets {offsets!r}")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise FileFormatError(f"{bad}: tensor {name!r} offsets {offsets} span {offsets[1] - offsets[0]} "
                                  f"bytes, its shape {shape} and dtype {dtype} need {nbytes}")
        spans.append((offsets[0], offsets[1], name))
    # The tensors must tile the data section exactly: no gaps, overlaps or bytes past the end.
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise FileFormatError(f"{bad}: tensor {name!r} starts at byte {begin}, expected {end} (gap or overlap)")
        end = stop
    if end != data_len:
        what = "truncated" if end > data_len else "trailing bytes"
        raise FileFormatError(f"{path}: {what}: tensors need {end} data bytes, the file holds {data_len}")
    return header, file_meta


def _parse_aceg_meta(path: Path, file_meta: dict, kind: str) -> dict:
    if META_KEY not in file_meta:
        raise FileFormatError(f"{path}: no {META_KEY!r} metadata; not an ACE-G {kind} file")
    try:
        info = json.loads(file_meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}: tampered or corrupt header: {META_KEY!r} metadata is not valid JSON") from exc
    if not isinstance(info, dict) or not isinstance(info.get("meta", {}), dict):
        raise FileFormatError(f"{path}: tampered or corrupt header: {META_KEY!r} metadata must be a JSON object")
    if info.get("kind") != kind:
        raise FileFormatError(f"{path}: wrong kind: file is {info.get('kind')!r}, expected {kind!r}")
    if "format_version" not in info:
        raise FileFormatError(f"{path}: missing format_version (this code reads version {FORMAT_VERSION})")
    if info["format_version"] != FORMAT_VERSION:
        raise FileFormatError(f"{path}: unsupported format version {info['format_version']!r} "
                              f"(this code reads version {FORMAT_VERSION})")
    return info.get("meta", {})


def _read_header(f: BinaryIO, path: Path, size: int, kind: str) -> tuple[dict, dict]:
    """(validated tensor entries, the caller's meta) from an open file; reads only the header."""
    prefix = f.read(8)
    # Bound the header before reading it: a forged length must not make us allocate gigabytes.
    header_len = int.from_bytes(prefix.ljust(8, b"\0"), "little")
    if len(prefix) < 8 or header_len > MAX_HEADER_BYTES:
        _refuse_pickle(path, prefix)  # their first 8 bytes read as an absurd length
    if len(prefix) < 8:
        raise FileFormatError(f"{path}: truncated: {size} bytes, not even a safetensors header length")
    if header_len > MAX_HEADER_BYTES:
        raise FileFormatError(f"{path}: not a safetensors file: header length {header_len} bytes exceeds "
                              f"the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > size:
        raise FileFormatError(f"{path}: truncated: header length {header_len} bytes, file is {size} bytes")
    entries, file_meta = _parse_header(path, f.read(header_len), size - 8 - header_len)
    return entries, _parse_aceg_meta(path, file_meta, kind)


def _open_checked(path: str | Path, kind: str, max_bytes: int) -> tuple[Path, int]:
    _check_kind(kind)
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise FileFormatError(f"{path}: {size} bytes exceeds max_bytes={max_bytes}")
    return path, size


def read_meta(path: str | Path, kind: Kind, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """The caller's meta of a file written by :func:`save_tensors`, without reading tensor data.

    Runs the same header checks as :func:`load_tensors` (e.g. to build a model
    from its stored config before loading and checking its weights).
    """
    path, size = _open_checked(path, kind, max_bytes)
    with open(path, "rb") as f:
        return _read_header(f, path, size, kind)[1]


def load_tensors(
    path: str | Path,
    kind: Kind,
    expected_shapes: dict[str, tuple] | None = None,
    expected_meta: dict | None = None,
    expected_dtypes: dict[str, torch.dtype] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`: (tensors on the CPU, the caller's meta).

    ``expected_shapes``: the exact set of tensor names and their shapes
    (``None`` in a shape matches any size). ``expected_meta``: entries that
    must be present and equal (e.g. ``{"model_hash": tensor_hash(model)}``;
    values compare as read back from JSON, so tuples come back as lists).
    ``expected_dtypes``: dtype per name. Raises :class:`FileFormatError`
    (a ``ValueError``) saying why for anything else; ``OSError`` if unreadable.
    """
    path, size = _open_checked(path, kind, max_bytes)
    with open(path, "rb") as f:
        entries, meta = _read_header(f, path, size, kind)

        # Names, shapes and dtypes from the header, before reading any tensor data.
        if expected_shapes is not None:
            missing = sorted(set(expected_shapes) - set(entries))
            unexpected = sorted(set(entries) - set(expected_shapes))
            if missing or unexpected:
                raise FileFormatError(f"{path}: wrong tensor names: missing {missing}, unexpected {unexpected}")
            for name, want in expected_shapes.items():
                got = entries[name]["shape"]
                if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
                    raise FileFormatError(f"{path}: tensor {name!r} has shape {tuple(got)}, expected {tuple(want)}")
        for name, want_dtype in (expected_dtypes or {}).items():
            if name not in entries:
                raise FileFormatError(f"{path}: wrong tensor names: missing {name!r}")
            if (got_dtype := _DTYPES[entries[name]["dtype"]]) != want_dtype:
                raise FileFormatError(f"{path}: tensor {name!r} has dtype {got_dtype}, expected {want_dtype}")
        for key, want in (expected_meta or {}).items():
            if key not in meta:
                raise FileFormatError(f"{path}: metadata lacks {key!r} (expected {want!r})")
            if meta[key] != want:
                raise FileFormatError(f"{path}: metadata {key!r} mismatch: file has {meta[key]!r}, expected {want!r} "
                                      "(was it made with another model or configuration?)")
        f.seek(0)
        blob = f.read(size + 1)
    if len(blob) != size:
        raise FileFormatError(f"{path}: file changed size while being read ({size} -> {len(blob)} bytes)")
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as exc:  # safetensors' own checks, as a second line
        raise FileFormatError(f"{path}: tampered or corrupt file: {exc}") from exc
    for name, t in tensors.items():
        if (bad := _nonfinite_count(t)) > 0:
            raise FileFormatError(f"{path}: tensor {name!r} has {bad} non-finite values (NaN/inf)")
    return tensors, meta
