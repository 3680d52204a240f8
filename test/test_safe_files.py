"""Model and map files: bit-exact round trips, atomic writes, and clear refusals."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from aceg_model import safe_files
from aceg_model.safe_files import FORMAT_VERSION, FileFormatError, load_tensors, save_tensors, tensor_hash

MODEL_HASH = "0" * 64


def example_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "codes_MD": torch.randn(16, 8, generator=g),
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "half_weights": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "counts": torch.arange(5, dtype=torch.int64),
        "valid": torch.tensor([True, False]),
    }


@pytest.fixture
def map_file(tmp_path: Path) -> Path:
    path = tmp_path / "scene.map.safetensors"
    save_tensors(path, example_tensors(), {"model_hash": MODEL_HASH, "scene_frame": "map"}, kind="aceg-map")
    return path


def raw_file(path: Path, tensors: dict[str, torch.Tensor], aceg_meta: object) -> Path:
    """A safetensors file written without save_tensors' checks, to forge bad metadata."""
    path.write_bytes(safetensors.torch.save(tensors, metadata={"aceg": json.dumps(aceg_meta)}))
    return path


def split(path: Path) -> tuple[bytes, bytes]:
    """(header JSON bytes, data bytes) of a safetensors file."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return blob[8:8 + n], blob[8 + n:]


def test_round_trip_is_bit_exact(map_file: Path) -> None:
    tensors, meta = load_tensors(map_file, "aceg-map", expected_meta={"model_hash": MODEL_HASH})
    original = example_tensors()
    assert set(tensors) == set(original)
    for name, t in original.items():
        assert tensors[name].dtype == t.dtype and tensors[name].shape == t.shape
        assert tensors[name].view(-1).view(torch.uint8).tolist() == t.view(-1).view(torch.uint8).tolist()
    assert meta == {"model_hash": MODEL_HASH, "scene_frame": "map"}
    assert tensor_hash(tensors) == tensor_hash(original)


def test_expected_shapes_and_dtypes_accept_a_matching_file(map_file: Path) -> None:
    shapes = {"codes_MD": (None, 8), "scale": (), "half_weights": (4, 3), "counts": (5,), "valid": (2,)}
    load_tensors(map_file, "aceg-map", expected_shapes=shapes, expected_dtypes={"codes_MD": torch.float32})


def test_tensor_hash_is_stable_and_sensitive() -> None:
    tensors = example_tensors()
    reordered = dict(reversed(list(tensors.items())))
    reordered["codes_MD"] = tensors["codes_MD"].t().contiguous().t()  # same values, other memory layout
    assert tensor_hash(reordered) == tensor_hash(tensors)
    assert len(tensor_hash(tensors)) == 64
    changed = dict(tensors, counts=tensors["counts"] + 1)
    renamed = {("x" if k == "scale" else k): v for k, v in tensors.items()}
    recast = dict(tensors, counts=tensors["counts"].to(torch.int32))
    reshaped = dict(tensors, codes_MD=tensors["codes_MD"].reshape(8, 16))
    hashes = {tensor_hash(t) for t in (tensors, changed, renamed, recast, reshaped)}
    assert len(hashes) == 5


def test_atomic_write_keeps_the_old_file_when_replace_fails(map_file: Path, monkeypatch) -> None:
    before = map_file.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        save_tensors(map_file, {"other": torch.zeros(3)}, {}, kind="aceg-map")
    assert map_file.read_bytes() == before
    assert sorted(p.name for p in map_file.parent.iterdir()) == [map_file.name]  # temp file removed


def test_atomic_write_keeps_the_old_file_when_fsync_fails(map_file: Path, monkeypatch) -> None:
    before = map_file.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("I/O error (simulated)")))
    with pytest.raises(OSError, match="simulated"):
        save_tensors(map_file, {"other": torch.zeros(3)}, {}, kind="aceg-map")
    assert map_file.read_bytes() == before
    assert len(list(map_file.parent.iterdir())) == 1


def test_save_refuses_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="non-finite"):
        save_tensors(path, {"a": torch.tensor([1.0, float("nan")])}, {}, kind="aceg-model")
    with pytest.raises(ValueError, match="JSON"):
        save_tensors(path, {"a": torch.zeros(1)}, {"x": float("nan")}, kind="aceg-model")
    with pytest.raises(ValueError, match="kind"):
        save_tensors(path, {"a": torch.zeros(1)}, {}, kind="checkpoint")
    assert not path.exists()


def test_refuses_truncated_file(map_file: Path) -> None:
    blob = map_file.read_bytes()
    map_file.write_bytes(blob[:-10])
    with pytest.raises(FileFormatError, match="truncated"):
        load_tensors(map_file, "aceg-map")
    map_file.write_bytes(blob[:5])
    with pytest.raises(FileFormatError, match="truncated"):
        load_tensors(map_file, "aceg-map")
    map_file.write_bytes(blob[:100])
    with pytest.raises(FileFormatError, match="truncated"):
        load_tensors(map_file, "aceg-map")


def test_refuses_huge_header_length(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(FileFormatError, match="header length .* exceeds"):
        load_tensors(path, "aceg-map")


def test_refuses_file_over_max_bytes(map_file: Path) -> None:
    with pytest.raises(FileFormatError, match="exceeds max_bytes"):
        load_tensors(map_file, "aceg-map", max_bytes=100)


@pytest.mark.parametrize("zipfile", [True, False])
def test_refuses_torch_pickle_files(tmp_path: Path, zipfile: bool) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(FileFormatError, match="torch.save / pickle file"):
        load_tensors(path, "aceg-model")


def test_refuses_wrong_kind(map_file: Path) -> None:
    with pytest.raises(FileFormatError, match="wrong kind: file is 'aceg-map', expected 'aceg-model'"):
        load_tensors(map_file, "aceg-model")


def test_refuses_wrong_or_missing_version(tmp_path: Path) -> None:
    wrong = raw_file(tmp_path / "v.safetensors", {"a": torch.zeros(2)},
                     {"kind": "aceg-map", "format_version": FORMAT_VERSION + 1, "meta": {}})
    with pytest.raises(FileFormatError, match="unsupported format version"):
        load_tensors(wrong, "aceg-map")
    missing = raw_file(tmp_path / "m.safetensors", {"a": torch.zeros(2)}, {"kind": "aceg-map", "meta": {}})
    with pytest.raises(FileFormatError, match="missing format_version"):
        load_tensors(missing, "aceg-map")


def test_refuses_plain_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    path.write_bytes(safetensors.torch.save({"a": torch.zeros(2)}))
    with pytest.raises(FileFormatError, match="no 'aceg' metadata"):
        load_tensors(path, "aceg-map")


def test_refuses_wrong_model_hash(map_file: Path) -> None:
    with pytest.raises(FileFormatError, match="'model_hash' mismatch"):
        load_tensors(map_file, "aceg-map", expected_meta={"model_hash": "f" * 64})
    with pytest.raises(FileFormatError, match="lacks 'intrinsics'"):
        load_tensors(map_file, "aceg-map", expected_meta={"intrinsics": "opencv"})


def test_refuses_wrong_names_shapes_dtypes(map_file: Path) -> None:
    shapes = {"codes_MD": (16, 8), "scale": (), "half_weights": (4, 3), "counts": (5,), "valid": (2,)}
    with pytest.raises(FileFormatError, match=r"missing \['extra'\], unexpected \[\]"):
        load_tensors(map_file, "aceg-map", expected_shapes=dict(shapes, extra=(1,)))
    with pytest.raises(FileFormatError, match=r"'codes_MD' has shape \(16, 8\), expected \(32, 8\)"):
        load_tensors(map_file, "aceg-map", expected_shapes=dict(shapes, codes_MD=(32, 8)))
    with pytest.raises(FileFormatError, match="'counts' has dtype torch.int64, expected torch.int32"):
        load_tensors(map_file, "aceg-map", expected_dtypes={"counts": torch.int32})


def test_refuses_nan_tensor(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "nan.safetensors", {"a": torch.tensor([0.0, float("nan"), float("inf")])},
                    {"kind": "aceg-map", "format_version": FORMAT_VERSION, "meta": {}})
    with pytest.raises(FileFormatError, match="'a' has 2 non-finite values"):
        load_tensors(path, "aceg-map")


def test_refuses_garbage_header(map_file: Path) -> None:
    header, data = split(map_file)
    garbage = b"{not json at all" + b" " * (len(header) - 16)
    map_file.write_bytes(len(garbage).to_bytes(8, "little") + garbage + data)
    with pytest.raises(FileFormatError, match="tampered or corrupt header: not valid JSON"):
        load_tensors(map_file, "aceg-map")


def test_refuses_tampered_offsets(map_file: Path) -> None:
    header, data = split(map_file)
    entries = json.loads(header)
    first = min((e for k, e in entries.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][0])
    first["data_offsets"] = [first["data_offsets"][0] + 4, first["data_offsets"][1] + 4]  # overlaps its neighbour
    forged = json.dumps(entries).encode()
    map_file.write_bytes(len(forged).to_bytes(8, "little") + forged + data)
    with pytest.raises(FileFormatError, match="tampered or corrupt header: .*(gap or overlap|need)"):
        load_tensors(map_file, "aceg-map")


def test_refuses_tampered_metadata_json(tmp_path: Path) -> None:
    path = tmp_path / "meta.safetensors"
    path.write_bytes(safetensors.torch.save({"a": torch.zeros(2)}, metadata={"aceg": "{broken"}))
    with pytest.raises(FileFormatError, match="'aceg' metadata is not valid JSON"):
        load_tensors(path, "aceg-map")


def test_read_meta_reads_only_the_checked_header(map_file: Path) -> None:
    assert safe_files.read_meta(map_file, "aceg-map") == {"model_hash": MODEL_HASH, "scene_frame": "map"}
    with pytest.raises(FileFormatError, match="wrong kind"):
        safe_files.read_meta(map_file, "aceg-model")
