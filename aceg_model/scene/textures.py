"""Surface textures: real-photo crops and procedural patterns, unique per surface.

Every surface gets its own texture image, sized to its physical extent at a
fixed texel density, so no texture tile repeats across a surface or between
surfaces (repeats make scene coordinates ambiguous, ../shared/FINDINGS.md).
Photo crops come from scikit-image's bundled samples and, when present, the
Strecha and KITTI images under ../shared/data. The held-out evaluation scene
(7-Scenes redkitchen) is never used.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np

# scikit-image samples that ship with the wheel (no download) and are photos
# or photo-like; `horse` (binary silhouette) and `checkerboard` are left out.
SKIMAGE_SAMPLES = (
    "astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "grass", "gravel",
    "moon", "page", "rocket", "text", "immunohistochemistry", "retina", "hubble_deep_field",
    "clock", "colorwheel", "cell", "stereo_motorcycle",
)
MAX_PHOTO_SIDE = 1024  # px; larger photos are downscaled once on load to bound memory


def default_shared_data() -> Path:
    """``$ACEG_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("ACEG_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def list_photo_sources(shared_data: Path | None = None, use_shared: bool = True) -> list[str]:
    """Identifiers of every photo usable as texture, in a fixed order.

    ``skimage:<name>`` always; ``file:<path>`` for Strecha and KITTI images
    when ``use_shared`` and the folder exists. The list (hence the scenes a
    seed gives) depends on whether ../shared/data is present.
    """
    sources = [f"skimage:{name}" for name in SKIMAGE_SAMPLES]
    root = shared_data or default_shared_data()
    if use_shared and root.is_dir():
        files = sorted(root.glob("strecha-mvs-gt/*/images/*.jpg"))
        files += sorted(root.glob("kitti-odometry-snippets/*/image_l/*.png"))
        sources += [f"file:{p}" for p in files if "7scenes" not in str(p) and "redkitchen" not in str(p)]
    return sources


@functools.lru_cache(maxsize=48)
def load_photo(source: str) -> np.ndarray:
    """The photo named by a ``list_photo_sources`` identifier as uint8 HxWx3 RGB."""
    if "redkitchen" in source or "7scenes" in source:
        raise ValueError(f"{source}: 7-Scenes images are held out and never used as textures")
    kind, _, name = source.partition(":")
    if kind == "skimage":
        import skimage.data

        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image
    elif kind == "file":
        image = cv2.imread(name, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read texture photo {name}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    else:
        raise ValueError(f"unknown photo source {source!r}; expected 'skimage:<name>' or 'file:<path>'")
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float32) / max(float(image.max()), 1e-6))).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3])
    scale = MAX_PHOTO_SIDE / max(image.shape[:2])
    if scale < 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image


# ---------------------------------------------------------------------------
# Building blocks. All work on float32 HxWx3 images in [0, 1].


def noise_field(h: int, w: int, cell_px: float, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """Smooth random field in [-1, 1] with features about ``cell_px`` texels wide (never periodic)."""
    gh, gw = max(2, int(np.ceil(h / cell_px)) + 2), max(2, int(np.ceil(w / cell_px)) + 2)
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw, channels)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * cell_px), int(gh * cell_px)), interpolation=cv2.INTER_CUBIC)
    big = big.reshape(big.shape[0], big.shape[1], channels)
    return np.clip(big[:h, :w], -1.0, 1.0)


def fractal_noise(h: int, w: int, cell_px: float, rng: np.random.Generator, octaves: int = 4) -> np.ndarray:
    """Sum of ``octaves`` noise fields, each half the feature size, in about [-1, 1]; HxWx1."""
    out = np.zeros((h, w, 1), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        out += amp * noise_field(h, w, max(cell_px, 2.0), rng)
        total += amp
        cell_px, amp = cell_px / 2.0, amp * 0.55
    return out / total


def photo_group(source: str) -> str:
    """'skimage', 'strecha', 'kitti' (or 'other'): photos are drawn group first, so the
    102 grey KITTI frames do not crowd out the colour photos."""
    if source.startswith("skimage:"):
        return "skimage"
    return next((g for g in ("strecha", "kitti") if g in source), "other")


@functools.lru_cache(maxsize=8)
def _groups(photos: tuple[str, ...]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for p in photos:
        groups.setdefault(photo_group(p), []).append(p)
    return [groups[k] for k in sorted(groups)]


def pick_photo(photos: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
    """A random photo: a random group, then a random member."""
    groups = _groups(tuple(photos))
    group = groups[rng.integers(len(groups))]
    return load_photo(group[rng.integers(len(group))])


def photo_crop(h: int, w: int, photos: tuple[str, ...], rng: np.random.Generator, zoom: float) -> np.ndarray:
    """A random crop of a random photo resized to ``h`` x ``w`` texels, randomly flipped,
    rotated and colour-jittered. ``zoom`` > 1 magnifies (fewer photo pixels per texel)."""
    if h < 2 or w < 2:  # too small to show anything (very low texel densities)
        return np.full((max(h, 0), max(w, 0), 3), 0.5, np.float32)
    photo = pick_photo(photos, rng)
    if rng.random() < 0.2:
        photo = np.rot90(photo)
    ph, pw = photo.shape[:2]
    # Crop with the target aspect ratio, as large as `zoom` allows.
    ch = min(ph, max(8, int(round(h / zoom))))
    cw = min(pw, max(8, int(round(ch * w / h))))
    ch = min(ph, max(8, int(round(cw * h / w))))
    y0, x0 = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if ch > h else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=interp).astype(np.float32) / 255.0
    return colour_jitter(out, rng)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Random contrast, brightness and per-channel gains; grey photos get a random tint."""
    grey = float(np.abs(image - image.mean(axis=2, keepdims=True)).mean()) < 0.01
    gains = rng.uniform(0.8, 1.15, size=3) if grey else rng.uniform(0.9, 1.1, size=3) ** strength
    contrast = rng.uniform(0.7, 1.2)
    mean = image.mean()
    out = (image - mean) * contrast + mean * rng.uniform(0.8, 1.15)
    return np.clip(out * gains.astype(np.float32), 0.0, 1.0)


def random_palette(rng: np.random.Generator, n: int, photos: list[str]) -> np.ndarray:
    """``n`` colours picked from a random photo (so they look natural), n x 3 in [0, 1]."""
    photo = pick_photo(photos, rng)
    ys, xs = rng.integers(0, photo.shape[0], n), rng.integers(0, photo.shape[1], n)
    colours = photo[ys, xs].astype(np.float32) / 255.0
    colours = 0.7 * colours + 0.3 * colours.mean(axis=1, keepdims=True)  # less saturated
    return np.clip(colours * 0.8 + 0.15, 0.0, 1.0)


def split_rects(h: int, w: int, min_px: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Random recursive split of an ``h`` x ``w`` rectangle into (y0, x0, h, w) cells."""
    out, todo = [], [(0, 0, h, w)]
    while todo:
        y0, x0, ch, cw = todo.pop()
        can_y, can_x = ch >= 2 * min_px, cw >= 2 * min_px
        if not (can_y or can_x) or (rng.random() < 0.25 and ch * cw < 16 * min_px * min_px):
            out.append((y0, x0, ch, cw))
            continue
        if can_x and (not can_y or cw * rng.uniform(0.6, 1.4) > ch):
            s = int(rng.integers(min_px, cw - min_px + 1))
            todo += [(y0, x0, ch, s), (y0, x0 + s, ch, cw - s)]
        else:
            s = int(rng.integers(min_px, ch - min_px + 1))
            todo += [(y0, x0, s, cw), (y0 + s, x0, ch - s, cw)]
    return out


# ---------------------------------------------------------------------------
# Materials. Each returns a float32 h x w x 3 image; `px_per_m` gives physical scale.


def mat_photo(h, w, px_per_m, rng, photos):
    """One photo crop stretched over the whole surface (a large print, a painted wall)."""
    return photo_crop(h, w, photos, rng, zoom=rng.uniform(0.3, 1.5) * px_per_m / 200.0)


def mat_mosaic(h, w, px_per_m, rng, photos):
    """Rectangles of different photos (posters, panels, shelves of things)."""
    out = np.empty((h, w, 3), np.float32)
    min_px = max(4, int(rng.uniform(0.25, 0.8) * px_per_m))
    gap = max(1, int(0.01 * px_per_m))
    out[:] = random_palette(rng, 1, photos)[0]
    for y0, x0, ch, cw in split_rects(h, w, min_px, rng):
        ih, iw = max(1, ch - gap), max(1, cw - gap)
        out[y0 : y0 + ih, x0 : x0 + iw] = photo_crop(ih, iw, photos, rng, zoom=rng.uniform(0.4, 2.0))
    return out


def mat_tiles(h, w, px_per_m, rng, photos):
    """Bricks, tiles or planks: a staggered grid whose every element has its own colour and detail."""
    th = max(3, int(rng.uniform(0.06, 0.6) * px_per_m))
    tw = max(3, int(th * rng.choice([1.0, 2.0, 3.0, 6.0])))
    if rng.random() < 0.5:
        th, tw = tw, th
    mortar = max(1, int(th * rng.uniform(0.03, 0.12)))
    palette = random_palette(rng, 3, photos)
    detail = photo_crop(h, w, photos, rng, zoom=rng.uniform(0.5, 2.0)).mean(axis=2, keepdims=True)
    ys, xs = np.mgrid[0:h, 0:w]
    row = ys // th
    shift = ((row * rng.uniform(0.3, 0.7)) % 1.0 * tw).astype(np.int64) if rng.random() < 0.7 else 0
    col = (xs + shift) // tw
    # A unique colour per element: the base colour with its own brightness and a slight hue shift.
    n_rows, n_cols = h // th + 2, (w + tw * 2) // tw + 2
    base = palette[rng.integers(1, 3)]
    shade = rng.uniform(0.7, 1.15, size=(n_rows, n_cols, 1)) * rng.uniform(0.97, 1.03, size=(n_rows, n_cols, 3))
    elem = (base * shade).astype(np.float32)
    out = elem[row, col] * (0.65 + 0.7 * detail)
    gap = ((ys % th) < mortar) | (((xs + shift) % tw) < mortar)
    out[gap] = palette[0] * 0.5
    return out


def mat_noise(h, w, px_per_m, rng, photos):
    """Stone/plaster-like fractal noise between two colours, with photo grain and stains."""
    palette = random_palette(rng, 3, photos)
    a = np.clip(0.5 + 0.9 * fractal_noise(h, w, rng.uniform(0.1, 0.8) * px_per_m, rng), 0.0, 1.0)
    b = np.clip(0.5 + 0.9 * fractal_noise(h, w, rng.uniform(0.02, 0.2) * px_per_m, rng), 0.0, 1.0)
    out = palette[0] * (1 - a) + palette[1] * a
    out = out * (0.75 + 0.5 * b)
    grain = photo_crop(h, w, photos, rng, zoom=rng.uniform(1.0, 3.0)).mean(axis=2, keepdims=True)
    return out * (0.6 + 0.8 * grain)


def mat_facade(h, w, px_per_m, rng, photos):
    """A building front: wall material with a grid of windows, each showing its own photo crop."""
    out = (mat_tiles if rng.random() < 0.5 else mat_noise)(h, w, px_per_m, rng, photos)
    floor_h, bay_w = rng.uniform(2.8, 3.6) * px_per_m, rng.uniform(2.0, 4.0) * px_per_m
    win_h, win_w = floor_h * rng.uniform(0.4, 0.65), bay_w * rng.uniform(0.35, 0.7)
    frame = max(1, int(0.06 * px_per_m))
    frame_colour = random_palette(rng, 1, photos)[0]
    for fy in np.arange(floor_h * 0.25, h - win_h, floor_h):
        for fx in np.arange(bay_w * 0.5 - win_w / 2, w - win_w, bay_w):
            y0, x0, wh, ww = int(fy), int(fx + rng.normal(0, 0.02) * px_per_m), int(win_h), int(win_w)
            x0 = int(np.clip(x0, 0, w - ww))
            out[y0 : y0 + wh, x0 : x0 + ww] = frame_colour
            glass = photo_crop(wh - 2 * frame, ww - 2 * frame, photos, rng, zoom=rng.uniform(0.5, 2.0))
            out[y0 + frame : y0 + wh - frame, x0 + frame : x0 + ww - frame] = glass * rng.uniform(0.3, 0.8)
    return out


def mat_decals(out, px_per_m, rng, photos, count):
    """Paste ``count`` framed photo crops (pictures, signs) onto a surface, in place."""
    h, w = out.shape[:2]
    for _ in range(count):
        dh = int(rng.uniform(0.2, 0.9) * px_per_m)
        dw = int(dh * rng.uniform(0.6, 1.8))
        if dh + 4 >= h or dw + 4 >= w:
            continue
        y0, x0 = rng.integers(0, h - dh), rng.integers(0, w - dw)
        out[y0 : y0 + dh, x0 : x0 + dw] = random_palette(rng, 1, photos)[0] * 0.6
        b = max(1, dh // 20)
        out[y0 + b : y0 + dh - b, x0 + b : x0 + dw - b] = photo_crop(dh - 2 * b, dw - 2 * b, photos, rng, 1.0)
    return out


MATERIALS = {"photo": mat_photo, "mosaic": mat_mosaic, "tiles": mat_tiles, "noise": mat_noise, "facade": mat_facade}


def make_texture(
    h: int, w: int, px_per_m: float, material: str, rng: np.random.Generator, photos: list[str], decals: int = 0
) -> np.ndarray:
    """A unique uint8 ``h`` x ``w`` x 3 texture of ``material`` for one surface.

    A low-frequency brightness/colour field and fine grain, drawn fresh for
    every surface, are multiplied in, so even two surfaces made from the same
    photo region never share texels.
    """
    if material not in MATERIALS:
        raise ValueError(f"unknown material {material!r}; expected one of {sorted(MATERIALS)}")
    out = MATERIALS[material](h, w, px_per_m, rng, photos)
    if decals:
        out = mat_decals(out, px_per_m, rng, photos, decals)
    # Mostly brightness (dirt, uneven paint), a little colour.
    cell = rng.uniform(0.4, 1.5) * px_per_m
    low = (1.0 + 0.15 * noise_field(h, w, cell, rng)) * (1.0 + 0.03 * noise_field(h, w, cell, rng, channels=3))
    grain = 1.0 + 0.06 * noise_field(h, w, 1.5, rng)
    return np.clip(out * low * grain * 255.0 + 0.5, 0, 255).astype(np.uint8)
