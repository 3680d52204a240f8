"""Posed-image datasets: 7-Scenes, redkitchen, KITTI odometry, Strecha, and our own posed folders.

Every loader returns a lazy :class:`PosedImageDataset`, a ``Sequence[Frame]``
that reads an image (and depth) from disk only when a frame is indexed, so a
1000-frame dataset costs a directory listing until it is used. Frames follow
the conventions of :mod:`aceg_model.frames`: ``uint8`` RGB (``HxW`` grey for
single-channel cameras, as stored), intrinsics in pixels, ``T_world_cam``
camera-to-world in metres, stamps in seconds, depth float32 metres (0 invalid)
registered to the image's intrinsics.

Layouts (``open_dataset`` detects them):

- ``7scenes``: ``seq-NN/frame-XXXXXX.{color.png|color.jpg,depth.png,pose.txt}``,
  ``TrainSplit.txt``/``TestSplit.txt`` listing ``sequenceN``.
- ``redkitchen``: ``frames/frame-XXXXXX.*`` as above, ``split_blocks100_{mapping,query}.txt``;
  its ``camera-intrinsics.txt`` is the depth camera.
- ``posed-folder``: written by :func:`write_posed_folder`; ``frames/`` as above plus
  ``intrinsics.yaml`` (or ``.txt``), optional ``stamps.txt`` and ``<split>.txt`` lists.
- ``kitti``: ``image_l/NNNNNN.png`` (or ``image_0``), ``poses.txt``, ``calib.txt``.
- ``strecha``: one scene, ``images/NNNN.jpg`` and ``cameras_WxH.txt``.
"""
from __future__ import annotations

import operator
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from aceg_model.frames import Frame, Intrinsics, check_pose
from aceg_model.geometry import make_pose

# 7-Scenes colour convention of DSAC*/ACE (the redkitchen README checked 525 against
# SIFT matches: 0.7-3 px epipolar error vs 0.8-7 px for the depth camera's 585).
SEVEN_SCENES_SIZE = (640, 480)
SEVEN_SCENES_RGB_FOCAL = 525.0
SEVEN_SCENES_DEPTH_FOCAL = 585.0
SEVEN_SCENES_FPS = 30.0
SEQUENCE_GAP_S = 1.0  # between the last frame of one 7-Scenes sequence and the first of the next
KITTI_PERIOD_S = 0.1  # 10 Hz camera
DEPTH_INVALID_MM = 65535  # raw 7-Scenes marks missing depth with 65535 instead of 0
_COLOUR_SUFFIXES = (".color.png", ".color.jpg")  # PNG first: lossless wins when both exist
_RESERVED_TXT = {"intrinsics", "stamps"}  # .txt files of a posed folder that are not split lists


class PosedImageDataset(Sequence[Frame]):
    """A lazy, indexable sequence of :class:`Frame`; subclasses read one frame's parts on demand.

    ``names[i]`` names frame ``i``, ``stamps[i]`` is its time in seconds, and
    ``intrinsics`` is the camera when it is the same for every frame (else None).
    """

    kind = "base"

    def __init__(self, root: Path, names: list[str], stamps: Sequence[float],
                 intrinsics: Intrinsics | list[Intrinsics], with_depth: bool = False) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.stamps = np.asarray(stamps, dtype=np.float64)
        self.with_depth = with_depth
        if isinstance(intrinsics, Intrinsics):
            intrinsics = [intrinsics] * len(self.names)
        self._intrinsics = list(intrinsics)
        if not self.names:
            raise ValueError(f"{self.root}: no frames found (layout {self.kind})")
        if not len(self.stamps) == len(self._intrinsics) == len(self.names):
            raise ValueError(f"{self.root}: {len(self.names)} names, {len(self.stamps)} stamps, "
                             f"{len(self._intrinsics)} intrinsics; they must match")

    @property
    def intrinsics(self) -> Intrinsics | None:
        first = self._intrinsics[0]
        return first if all(k == first for k in self._intrinsics) else None

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int | slice) -> Frame | list[Frame]:  # a slice gives a list
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"frame index {index} out of range for {len(self)} frames")
        depth = self._depth(i) if self.with_depth else None
        return Frame(self._image(i), self._intrinsics[i], self.pose(i), float(self.stamps[i]), depth,
                     self.names[i], self._meta(i))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} frames)"

    def pose(self, i: int) -> np.ndarray:
        """``T_world_cam`` (4x4 float64, metres) of frame ``i`` without decoding its image."""
        raise NotImplementedError

    def poses(self) -> np.ndarray:
        """All poses as N x 4 x 4 camera-to-world matrices, no image decoded."""
        return np.stack([self.pose(i) for i in range(len(self))])

    def _image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _depth(self, i: int) -> np.ndarray | None:
        return None

    def _meta(self, i: int) -> dict:
        return {}


# --- file readers ---------------------------------------------------------------------------


def read_image(path: Path) -> np.ndarray:
    """An 8-bit image as stored: HxW grey or HxWx3 RGB (alpha dropped), no EXIF rotation."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read image {path} (missing or not a decodable image)")
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit image, got {image.dtype}")
    if image.ndim == 3:
        code = {1: None, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}.get(image.shape[2], -1)
        if code == -1:
            raise ValueError(f"{path}: unsupported channel count {image.shape[2]}")
        image = image[:, :, 0] if code is None else cv2.cvtColor(image, code)
    return np.ascontiguousarray(image)


def read_depth_mm(path: Path) -> np.ndarray:
    """A uint16 millimetre depth PNG as float32 metres, 0 (and 65535) meaning invalid."""
    depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if depth is None:
        raise ValueError(f"cannot read depth image {path}")
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"{path}: depth must be single-channel uint16 millimetres, "
                         f"got {depth.dtype} {depth.shape}")
    depth_m = depth.astype(np.float32) / 1000.0
    depth_m[depth == DEPTH_INVALID_MM] = 0.0
    return depth_m


def _floats(tokens: list[str], counts: tuple[int, ...], where: str) -> np.ndarray:
    if len(tokens) not in counts:
        raise ValueError(f"{where}: expected {' or '.join(map(str, counts))} numbers, got {len(tokens)}")
    try:
        return np.array(tokens, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{where}: expected numbers, got {' '.join(tokens)!r}") from None


def _numbers(path: Path, *counts: int) -> np.ndarray:
    """All numbers of a small text file (any whitespace, CRLF, exponents like ``e-001``)."""
    if not path.is_file():
        raise ValueError(f"missing file {path}")
    return _floats(path.read_text().split(), counts, str(path))


def read_pose_file(path: Path) -> np.ndarray:
    """A 4x4 (or 3x4) camera-to-world text matrix, validated; the error names the file."""
    if not path.is_file():
        raise ValueError(f"missing pose file {path}")
    return check_pose(_numbers(path, 12, 16).reshape(-1, 4), what=f"pose file {path}")


def read_K_file(path: Path) -> np.ndarray:  # noqa: N802 - K is the standard name
    """A 3x3 camera matrix written as 9 numbers, row-major."""
    return _numbers(Path(path), 9).reshape(3, 3)


def _read_name_list(path: Path) -> list[str]:
    """Frame names, one per line; blank lines and ``#`` comments skipped, file suffixes dropped."""
    if not path.is_file():
        raise ValueError(f"split list {path} does not exist")
    names = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [re.sub(r"\.(color\.png|color\.jpg|depth\.png|pose\.txt)$", "", n) for n in names if n]


def _frame_index(stem: str) -> int:
    match = re.search(r"(\d+)$", stem)
    if match is None:
        raise ValueError(f"frame name {stem!r} does not end in a frame number")
    return int(match.group(1))


def _scan_frames(folder: Path) -> list[str]:
    """Sorted stems (``frame-000000``) of the colour images in ``folder``."""
    if not folder.is_dir():
        raise ValueError(f"frame folder {folder} does not exist")
    stems = {f[: -len(s)] for f in os.listdir(folder) for s in _COLOUR_SUFFIXES if f.endswith(s)}
    return sorted(stems)


def _select_split(names: list[str], split: str | Path | None, split_files: dict[str, Path],
                  where: Path) -> list[str]:
    """``names`` restricted to a named split or an explicit list file, in dataset order."""
    if split is None:
        return names
    path = split_files.get(split) if isinstance(split, str) else None
    if path is None:
        path = Path(split)
        if not path.is_file():
            raise ValueError(f"unknown split {str(split)!r} for {where}; valid: {sorted(split_files)}, "
                             "None (all frames) or the path of a list file")
    wanted = set(_read_name_list(path))
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"split list {path} names {len(unknown)} frames not in {where}, e.g. {unknown[:3]}")
    return [n for n in names if n in wanted]


def register_depth(depth_m: np.ndarray, src: Intrinsics, dst: Intrinsics) -> np.ndarray:
    """Resample depth from camera ``src`` to ``dst`` sharing its centre and axes (nearest pixel).

    The 7-Scenes convention treats the colour and depth cameras as co-located,
    differing only in intrinsics, so registration is a separable pixel lookup.
    """
    if src == dst:
        return depth_m
    u_src = np.rint(src.cx + src.fx / dst.fx * (np.arange(dst.width) - dst.cx)).astype(np.int64)
    v_src = np.rint(src.cy + src.fy / dst.fy * (np.arange(dst.height) - dst.cy)).astype(np.int64)
    ok_u = (u_src >= 0) & (u_src < depth_m.shape[1])
    ok_v = (v_src >= 0) & (v_src < depth_m.shape[0])
    out = np.zeros((dst.height, dst.width), dtype=np.float32)
    out[np.ix_(ok_v, ok_u)] = depth_m[np.ix_(v_src[ok_v], u_src[ok_u])]
    return out


# --- folder layouts: 7-Scenes, redkitchen, posed folder ---------------------------------------


class PosedFolderDataset(PosedImageDataset):
    """Frames stored as ``<stem>.color.{png,jpg}``, ``<stem>.pose.txt`` and ``<stem>.depth.png``.

    ``stems`` are relative to ``root`` (``frames/frame-000000``, ``seq-01/frame-000000``).
    Depth is uint16 millimetres taken by a camera with ``depth_intrinsics``
    (None: already registered to the colour image) and is resampled to the colour camera.
    """

    def __init__(self, root: Path, stems: list[str], intrinsics: Intrinsics, stamps: Sequence[float], *,
                 names: list[str] | None = None, with_depth: bool = False,
                 depth_intrinsics: Intrinsics | None = None, source_names: dict[str, str] | None = None,
                 kind: str = "posed-folder") -> None:
        self.kind = kind
        super().__init__(root, names if names is not None else stems, stamps, intrinsics, with_depth)
        self.depth_intrinsics = depth_intrinsics
        self._source_names = source_names or {}
        listings: dict[Path, set[str]] = {}
        self._colour, self._pose, self._depth_path = [], [], []
        for stem in stems:
            folder, base = (self.root / stem).parent, Path(stem).name
            if folder not in listings:
                listings[folder] = set(os.listdir(folder))
            files = listings[folder]
            colour = next((base + s for s in _COLOUR_SUFFIXES if base + s in files), None)
            if colour is None:
                raise ValueError(f"no colour image {folder / base}.color.png or .color.jpg")
            # Check here, not on access, so a broken dataset fails when opened.
            if base + ".pose.txt" not in files:
                raise ValueError(f"missing pose file {folder / (base + '.pose.txt')} for {folder / colour}")
            self._colour.append(folder / colour)
            self._pose.append(folder / (base + ".pose.txt"))
            self._depth_path.append(folder / (base + ".depth.png") if base + ".depth.png" in files else None)

    def pose(self, i: int) -> np.ndarray:
        return read_pose_file(self._pose[i])

    def _image(self, i: int) -> np.ndarray:
        return read_image(self._colour[i])

    def _depth(self, i: int) -> np.ndarray | None:
        if self._depth_path[i] is None:
            return None
        depth_m = read_depth_mm(self._depth_path[i])
        if self.depth_intrinsics is None:
            return depth_m
        return register_depth(depth_m, self.depth_intrinsics, self._intrinsics[i])

    def _meta(self, i: int) -> dict:
        source = self._source_names.get(self.names[i])
        return {"source_name": source} if source is not None else {}


def load_7scenes(root: Path, split: str | None = None, *, with_depth: bool = False,
                 focal: float = SEVEN_SCENES_RGB_FOCAL, intrinsics: Intrinsics | None = None,
                 depth_focal: float = SEVEN_SCENES_DEPTH_FOCAL) -> PosedFolderDataset:
    """The official 7-Scenes layout; ``split`` is 'train', 'test' or None (all sequences).

    Colour intrinsics: ``intrinsics``, else f=``focal`` px with c=(320, 240) on 640x480.
    Frame names are ``seq-NN/frame-XXXXXX``. Stamps: frame index / 30 Hz within a
    sequence, each sequence starting 1 s after the previous one ends.
    """
    root = Path(root)
    seq_dirs = sorted(p for p in root.glob("seq-*") if p.is_dir())
    if split is not None:
        split_files = {"train": root / "TrainSplit.txt", "test": root / "TestSplit.txt"}
        if split not in split_files:
            raise ValueError(f"unknown 7-Scenes split {split!r} for {root}; "
                             "valid: 'train', 'test' or None (all)")
        seq_dirs = []
        for line in _read_name_list(split_files[split]):
            match = re.fullmatch(r"sequence\s*(\d+)", line, flags=re.IGNORECASE)
            if match is None:
                raise ValueError(f"{split_files[split]}: expected lines like 'sequence2', got {line!r}")
            seq_dirs.append(root / f"seq-{int(match.group(1)):02d}")
    stems, stamps, start_s = [], [], 0.0
    for seq_dir in seq_dirs:
        seq_stems = _scan_frames(seq_dir)
        seq_stamps = [start_s + _frame_index(s) / SEVEN_SCENES_FPS for s in seq_stems]
        stems += [f"{seq_dir.name}/{s}" for s in seq_stems]
        stamps += seq_stamps
        start_s = (seq_stamps[-1] if seq_stamps else start_s) + SEQUENCE_GAP_S
    w, h = SEVEN_SCENES_SIZE
    return PosedFolderDataset(
        root, stems, intrinsics or Intrinsics.centred(focal, w, h), stamps, with_depth=with_depth,
        depth_intrinsics=Intrinsics.centred(depth_focal, w, h), kind="7scenes",
    )


def _load_frames_folder(root: Path, split: str | Path | None, split_files: dict[str, Path],
                        intrinsics: Intrinsics, stamps_by_name: dict[str, float] | None = None,
                        **kw) -> PosedFolderDataset:
    """The one reader behind redkitchen and posed folders: ``root/frames/`` plus an intrinsics source."""
    names = _select_split(_scan_frames(root / "frames"), split, split_files, root)
    if stamps_by_name is None:
        stamps = [_frame_index(n) / SEVEN_SCENES_FPS for n in names]
    else:
        missing = [n for n in names if n not in stamps_by_name]
        if missing:
            raise ValueError(f"{root / 'stamps.txt'} has no stamp for {len(missing)} frames, "
                             f"e.g. {missing[:3]}")
        stamps = [stamps_by_name[n] for n in names]
    return PosedFolderDataset(root, [f"frames/{n}" for n in names], intrinsics, stamps, names=names, **kw)


def load_redkitchen(root: Path, split: str | Path | None = None, *, with_depth: bool = False,
                    focal: float = SEVEN_SCENES_RGB_FOCAL, intrinsics_file: Path | None = None,
                    intrinsics: Intrinsics | None = None) -> PosedFolderDataset:
    """The redkitchen layout; ``split`` is 'mapping', 'query', None (all) or a list file.

    Colour intrinsics: ``intrinsics``, else the 3x3 K in ``intrinsics_file``, else
    f=``focal`` px, c=(320, 240). ``camera-intrinsics.txt`` is the depth camera
    (f=585) and is used only to register depth. Stamps: frame index / 30 Hz.
    """
    root = Path(root)
    w, h = SEVEN_SCENES_SIZE
    if intrinsics is None:
        intrinsics = (Intrinsics.from_K(read_K_file(intrinsics_file), w, h) if intrinsics_file is not None
                      else Intrinsics.centred(focal, w, h))
    depth_K_file = root / "camera-intrinsics.txt"
    depth_intrinsics = (Intrinsics.from_K(read_K_file(depth_K_file), w, h) if depth_K_file.is_file()
                        else Intrinsics.centred(SEVEN_SCENES_DEPTH_FOCAL, w, h))
    split_files = {s: root / f"split_blocks100_{s}.txt" for s in ("mapping", "query")}
    return _load_frames_folder(root, split, split_files, intrinsics, with_depth=with_depth,
                               depth_intrinsics=depth_intrinsics, kind="redkitchen")


def _read_intrinsics(root: Path) -> Intrinsics:
    """``intrinsics.yaml`` (keys fx fy cx cy width height) or ``intrinsics.txt`` (those 6 numbers)."""
    keys = ("fx", "fy", "cx", "cy", "width", "height")
    if (root / "intrinsics.yaml").is_file():
        path = root / "intrinsics.yaml"
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise ValueError(f"{path}: expected the keys {', '.join(keys)}")
        values = [data[k] for k in keys]
    elif (root / "intrinsics.txt").is_file():
        values = list(_numbers(root / "intrinsics.txt", 6))
    else:
        raise ValueError(f"{root}: no intrinsics.yaml or intrinsics.txt")
    fx, fy, cx, cy, width, height = values
    return Intrinsics(float(fx), float(fy), float(cx), float(cy), int(width), int(height))


def load_posed_folder(root: Path, split: str | Path | None = None, *,
                      with_depth: bool = False) -> PosedFolderDataset:
    """A folder written by :func:`write_posed_folder`; ``split`` names any ``<split>.txt`` in ``root``.

    Stamps come from ``stamps.txt`` (``stem seconds [source name]``), else frame index / 30 Hz.
    """
    root = Path(root)
    split_files = {p.stem: p for p in root.glob("*.txt") if p.stem not in _RESERVED_TXT}
    stamps_by_name, source_names = None, {}
    if (root / "stamps.txt").is_file():
        stamps_by_name = {}
        for n, line in enumerate((root / "stamps.txt").read_text().splitlines(), start=1):
            parts = line.split(maxsplit=2)
            if parts:
                stamps_by_name[parts[0]] = float(_floats(parts[1:2], (1,), f"{root / 'stamps.txt'}:{n}")[0])
                if len(parts) == 3:
                    source_names[parts[0]] = parts[2]
    return _load_frames_folder(root, split, split_files, _read_intrinsics(root), stamps_by_name,
                               with_depth=with_depth, source_names=source_names)


def write_posed_folder(frames: Iterable[Frame], out_dir: Path,
                       splits: dict[str, list[str]] | None = None) -> Path:
    """Write frames losslessly as a posed folder that :func:`load_posed_folder` reads back.

    Files are numbered ``frames/frame-XXXXXX`` in iteration order: colour (or grey)
    PNG, pose text with 17 significant digits, depth as uint16 millimetres (rounded
    to 1 mm, must be < 65.535 m). ``stamps.txt`` keeps each stamp exactly and the
    frame's own name. ``splits`` maps a split name to frame names (``Frame.name``
    or the written stem); all frames must share one camera. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    frames_dir = out_dir / "frames"
    if frames_dir.is_dir() and any(frames_dir.iterdir()):
        raise ValueError(f"{frames_dir} is not empty; write a posed folder into a new directory")
    frames_dir.mkdir(parents=True, exist_ok=True)
    intrinsics, stem_of, stamp_lines = None, {}, []
    for i, frame in enumerate(frames):
        stem = f"frame-{i:06d}"
        intrinsics = intrinsics or frame.intrinsics
        if frame.intrinsics != intrinsics:
            raise ValueError(f"frame {frame.name!r} has intrinsics {frame.intrinsics}, the first frame "
                             f"{intrinsics}; a posed folder holds one camera")
        image = frame.image if frame.image.ndim == 2 else cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
        _imwrite(frames_dir / f"{stem}.color.png", image)
        np.savetxt(frames_dir / f"{stem}.pose.txt", check_pose(frame.T_world_cam), fmt="%.17g")
        if frame.depth is not None:
            depth = np.nan_to_num(np.asarray(frame.depth, dtype=np.float64), nan=0.0, posinf=0.0)
            depth_mm = np.rint(np.maximum(depth, 0.0) * 1000.0)
            if depth_mm.max() >= DEPTH_INVALID_MM:
                raise ValueError(f"frame {frame.name!r}: depth {depth.max():.3f} m does not fit "
                                 "uint16 millimetres (< 65.535 m)")
            _imwrite(frames_dir / f"{stem}.depth.png", depth_mm.astype(np.uint16))
        stamp_lines.append(f"{stem} {float(frame.stamp)!r} {frame.name}".rstrip() + "\n")
        stem_of[stem] = stem
        stem_of.setdefault(frame.name, stem)
    if intrinsics is None:
        raise ValueError(f"no frames to write to {out_dir}")
    # Plain Python numbers: repr of a numpy scalar is not YAML.
    fields = {k: float(getattr(intrinsics, k)) for k in ("fx", "fy", "cx", "cy")}
    fields |= {"width": int(intrinsics.width), "height": int(intrinsics.height)}
    (out_dir / "intrinsics.yaml").write_text(
        "# pinhole intrinsics in pixels (OpenCV pixel-centre convention), no distortion\n"
        + "".join(f"{k}: {v!r}\n" for k, v in fields.items()))
    (out_dir / "stamps.txt").write_text("".join(stamp_lines))
    for split, names in (splits or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split) or split in _RESERVED_TXT:
            raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-' "
                             f"and not one of {sorted(_RESERVED_TXT)}")
        unknown = [n for n in names if n not in stem_of]
        if unknown:
            raise ValueError(f"split {split!r} names frames that were not written, e.g. {unknown[:3]}")
        (out_dir / f"{split}.txt").write_text("".join(stem_of[n] + "\n" for n in names))
    return out_dir


def _imwrite(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


# --- KITTI and Strecha ---------------------------------------------------------------------


class ImageListDataset(PosedImageDataset):
    """Image files with poses known up front (from one pose file): KITTI, Strecha."""

    def __init__(self, root: Path, images: list[Path], poses: list[np.ndarray], stamps: Sequence[float],
                 intrinsics: Intrinsics | list[Intrinsics], kind: str, with_depth: bool = False) -> None:
        self.kind = kind
        if len(poses) != len(images):
            raise ValueError(f"{root}: {len(images)} images but {len(poses)} poses")
        self._images, self._poses = list(images), list(poses)
        super().__init__(root, [p.stem for p in images], stamps, intrinsics, with_depth)

    def pose(self, i: int) -> np.ndarray:
        return self._poses[i].copy()

    def _image(self, i: int) -> np.ndarray:
        return read_image(self._images[i])


def _text_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace tokens) of the non-blank, non-comment lines of a text file."""
    if not path.is_file():
        raise ValueError(f"missing file {path}")
    rows = [(n, line.split("#")[0].split()) for n, line in enumerate(path.read_text().splitlines(), start=1)]
    return [(n, tokens) for n, tokens in rows if tokens]


def load_kitti(root: Path, split: None = None, *, with_depth: bool = False) -> ImageListDataset:
    """A KITTI odometry sequence, left grey camera (cam0), images as stored; no splits, no depth.

    ``poses.txt``: one row-major 3x4 cam0-to-world matrix per frame (world = first
    camera, metres). K is the left 3x3 block of P0, the first line of ``calib.txt``.
    Stamps: i * 0.1 s (10 Hz).
    """
    root = Path(root)
    if split is not None:
        raise ValueError(f"KITTI folder {root} has no split lists; got split={split!r}, valid: None")
    image_dir = next((root / d for d in ("image_l", "image_0") if (root / d).is_dir()), None)
    if image_dir is None:
        raise ValueError(f"{root}: no image_l/ or image_0/ folder")
    images = sorted(image_dir.glob("*.png"))
    poses = [check_pose(_floats(row, (12,), f"{root / 'poses.txt'}:{n}").reshape(3, 4),
                        what=f"{root / 'poses.txt'}:{n}") for n, row in _text_rows(root / "poses.txt")]
    calib = _text_rows(root / "calib.txt")
    if not calib:
        raise ValueError(f"{root / 'calib.txt'} is empty; expected P0 on its first line")
    n, P0 = calib[0]
    P0 = P0[1:] if P0[0].endswith(":") else P0  # official files prefix lines with 'P0:'
    K_33 = _floats(P0, (12,), f"{root / 'calib.txt'}:{n} (P0)").reshape(3, 4)[:, :3]
    if not images:
        raise ValueError(f"{image_dir}: no PNG images")
    h, w = read_image(images[0]).shape[:2]
    return ImageListDataset(root, images, poses, np.arange(len(images)) * KITTI_PERIOD_S,
                            Intrinsics.from_K(K_33, w, h), "kitti", with_depth)


def load_strecha(root: Path, split: None = None, *, with_depth: bool = False) -> ImageListDataset:
    """One Strecha scene: ``images/NNNN.jpg`` and ``cameras_WxH.txt``; no splits, no depth.

    Camera lines are ``name fx fy cx cy R(9, row-major, camera-to-world) C(3, centre, metres)``,
    so ``T_world_cam = [R | C]`` (projection ``K [R^T | -R^T C]``). Stills without
    timing: stamp = image index.
    """
    root = Path(root)
    if split is not None:
        raise ValueError(f"Strecha scene {root} has no split lists; got split={split!r}, valid: None")
    cameras = sorted(root.glob("cameras_*.txt"))
    if len(cameras) != 1:
        raise ValueError(f"{root}: expected one cameras_WxH.txt, found {[p.name for p in cameras]}")
    size = re.fullmatch(r"cameras_(\d+)x(\d+)", cameras[0].stem)
    images, poses, intrinsics = [], [], []
    for n, tokens in _text_rows(cameras[0]):
        where = f"{cameras[0]}:{n}"
        values = _floats(tokens[1:], (16,), where)
        images.append(root / "images" / tokens[0])
        if not images[-1].is_file():
            raise ValueError(f"{where}: image {images[-1]} does not exist")
        w, h = (int(size.group(1)), int(size.group(2))) if size else read_image(images[-1]).shape[1::-1]
        intrinsics.append(Intrinsics(*map(float, values[:4]), w, h))
        poses.append(check_pose(make_pose(values[4:13].reshape(3, 3), values[13:16]), what=where))
    return ImageListDataset(root, images, poses, np.arange(len(images), dtype=np.float64), intrinsics,
                            "strecha", with_depth)


# --- detection ------------------------------------------------------------------------------

# Checked in this order: a posed folder is also a frames/ folder, so it goes before redkitchen.
_LAYOUTS = {
    "7scenes": (load_7scenes, "seq-NN/frame-XXXXXX.pose.txt (+ TrainSplit.txt/TestSplit.txt)",
                lambda p: (p / "TrainSplit.txt").is_file() or any(p.glob("seq-*/frame-*.pose.txt"))),
    "posed-folder": (load_posed_folder, "frames/frame-XXXXXX.* + intrinsics.yaml|.txt",
                     lambda p: (p / "frames").is_dir()
                     and ((p / "intrinsics.yaml").is_file() or (p / "intrinsics.txt").is_file())),
    "redkitchen": (load_redkitchen, "frames/frame-XXXXXX.{color.jpg|color.png,pose.txt}",
                   lambda p: (p / "frames").is_dir() and any((p / "frames").glob("*.pose.txt"))),
    "kitti": (load_kitti, "image_l/NNNNNN.png + poses.txt + calib.txt",
              lambda p: (p / "poses.txt").is_file() and (p / "calib.txt").is_file()),
    "strecha": (load_strecha, "images/NNNN.jpg + cameras_WxH.txt",
                lambda p: (p / "images").is_dir() and any(p.glob("cameras_*.txt"))),
}


def detect_layout(path: Path) -> str | None:
    """The layout name of a dataset folder, or None when no known layout matches."""
    return next((kind for kind, (_, _, matches) in _LAYOUTS.items() if matches(Path(path))), None)


def open_dataset(path: Path, kind: str = "auto", split: str | Path | None = None, **kw) -> PosedImageDataset:
    """Open a dataset folder of any known layout (``kind='auto'`` detects it).

    ``split`` and the keyword arguments go to the layout's loader (e.g. ``with_depth=True``,
    ``focal=525.0``).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"dataset path {path} is not a directory")
    if kind == "auto":
        kind = detect_layout(path)
        if kind is None:
            known = "; ".join(f"{k}: {hint}" for k, (_, hint, _) in _LAYOUTS.items())
            raise ValueError(f"{path} matches no known dataset layout; known layouts: {known}")
    if kind not in _LAYOUTS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid: 'auto', {', '.join(map(repr, _LAYOUTS))}")
    return _LAYOUTS[kind][0](path, split, **kw)
