"""View pairs made from real photos, for the encoder's correspondence loss.

A photo laid on a plane and seen by two virtual cameras gives two views whose
pixels correspond exactly: each view is a homography of the photo. Built as
``View`` records (image, depth, pose, scene coordinates on the plane), such a
pair goes through ``pretrain_data.view_correspondences`` like a rendered one.

Why: the generated scenes put photos on boxes and walls, so the encoder has
seen real textures, but only as patches of a rendered world. A whole real
photograph under a strong perspective change carries real image statistics
(optics, sensor noise, the clutter of real places) into the loss. The photos of
the tuning sequences (KITTI 06, Strecha Herz-Jesus-P25) are left out, so that
the scenes the checkpoints are chosen on stay unseen; 7-Scenes is never read.
"""
from __future__ import annotations

import cv2
import numpy as np

from aceg_model.frames import Frame, Intrinsics
from aceg_model.scene import PRESETS
from aceg_model.scene.textures import list_photo_sources, load_photo, photo_group

View = Frame

# Photos of the sequences the checkpoints are chosen on; never training pairs.
TUNING_SEQUENCES = ("seq06_", "Herz-Jesus")
# scikit-image samples that are photographs of real things (the rest are renders, scans, text).
PHOTO_SAMPLES = ("astronaut", "brick", "camera", "cat", "chelsea", "coffee", "grass", "gravel", "rocket",
                 "stereo_motorcycle")
PHOTO_WIDTH = 640  # px; photos are resized once so that a view magnifies them about 0.6-1.7x
PLANE_WIDTH_M = 1.0  # the photo's width on the plane; only ratios matter (depths scale with it)


def training_photos(use_shared: bool = True) -> list[str]:
    """``list_photo_sources`` identifiers usable for photo pairs, in a fixed order: the
    photo-like scikit-image samples, and the shared Strecha and KITTI photos outside the
    tuning sequences."""
    out = []
    for source in list_photo_sources(use_shared=use_shared):
        kind, _, name = source.partition(":")
        if kind == "skimage" and name not in PHOTO_SAMPLES:
            continue
        if any(t in name for t in TUNING_SEQUENCES):
            continue
        out.append(source)
    return out


def vga_photos(use_shared: bool = True) -> list[str]:
    """The training photos that a 640x480 view can see at their own sharpness: the Strecha photos
    (1024x683 here) outside the tuning sequences. The KITTI frames (310 rows) and the scikit-image
    samples (300-512) would be magnified 1.3-4x by such a view."""
    return [s for s in training_photos(use_shared) if photo_group(s) == "strecha"]


def vga_photo_pairs(sources: list[str] | None = None) -> "PhotoPairs":
    """Photo pairs for views of a 640x480 camera: the photos at 1024 px and each view showing
    0.6-1.0 of what the photo fills, so a 480 px view sees the photo at 0.7-1.2x its own pixels
    (``vga_photos`` by default)."""
    return PhotoPairs(vga_photos() if sources is None else sources, photo_width=1024, footprint=(0.6, 1.0))


def look_at(target_3: np.ndarray, tilt_deg: float, azimuth_deg: float, distance_m: float,
            roll_deg: float) -> np.ndarray:
    """Camera-to-world pose (OpenCV camera) looking at ``target_3`` on the plane z = 0 from
    ``distance_m`` away, its optical axis ``tilt_deg`` off the plane's normal (+z) towards
    ``azimuth_deg``, turned ``roll_deg`` about that axis. Untilted and unrolled, image x runs
    along world x and image y along world y (the photo upright)."""
    t, a = np.deg2rad(tilt_deg), np.deg2rad(azimuth_deg)
    z = np.array([np.sin(t) * np.cos(a), np.sin(t) * np.sin(a), np.cos(t)])
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    r = np.deg2rad(roll_deg)
    x, y = np.cos(r) * x + np.sin(r) * y, -np.sin(r) * x + np.cos(r) * y
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], 1)
    T[:3, 3] = target_3 - distance_m * z
    return T


def plane_view(photo: np.ndarray, K: Intrinsics, T_world_cam: np.ndarray, name: str = "photo") -> View:
    """``photo`` on the plane z = 0 (centred on the origin, ``PLANE_WIDTH_M`` wide, its rows
    along +y) as the camera ``K`` at ``T_world_cam`` sees it.

    Pixels whose ray misses the photo keep an image (the photo mirrored at its border, so
    that no artificial edge appears) but no surface: NaN scene coordinates and depth 0.
    """
    ph, pw = photo.shape[:2]
    m_per_px = PLANE_WIDTH_M / pw
    v, u = np.mgrid[0:K.height, 0:K.width].astype(np.float64)
    rays = np.stack([(u - K.cx) / K.fx, (v - K.cy) / K.fy, np.ones_like(u)], -1)  # camera frame, z = 1
    R, c = T_world_cam[:3, :3], T_world_cam[:3, 3]
    d = rays @ R.T
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = -c[2] / d[..., 2]  # ray parameter at z = 0; rays have unit z, so it is the depth
    X = c + depth[..., None] * d
    col = X[..., 0] / m_per_px + pw / 2 - 0.5
    row = X[..., 1] / m_per_px + ph / 2 - 0.5
    on = np.isfinite(depth) & (depth > 0) & (col >= 0) & (col <= pw - 1) & (row >= 0) & (row <= ph - 1)
    # Where a ray is parallel to the plane it has no intersection: sample the border there.
    map_x = np.nan_to_num(col, nan=-1.0, posinf=-1.0, neginf=-1.0).astype(np.float32)
    map_y = np.nan_to_num(row, nan=-1.0, posinf=-1.0, neginf=-1.0).astype(np.float32)
    image = cv2.remap(photo, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    coords = np.where(on[..., None], X, np.nan).astype(np.float32)
    return Frame(image, K, T_world_cam, 0.0, np.where(on, depth, 0.0).astype(np.float32), name,
                 {"scene_coords": coords})


class PhotoPairs:
    """Draws view pairs of real photos (``pair``); photos are loaded on first use."""

    def __init__(self, sources: list[str] | None = None, max_tilt_deg: float = 50.0,
                 max_roll_deg: float = 20.0, photo_width: int = PHOTO_WIDTH,
                 footprint: tuple[float, float] = (0.35, 0.8)) -> None:
        self.sources = training_photos() if sources is None else list(sources)
        if not self.sources:
            raise ValueError("no photos for photo pairs")
        if photo_width < 8 or not 0 < footprint[0] <= footprint[1]:
            raise ValueError(f"need photo_width >= 8 and 0 < footprint[0] <= footprint[1], "
                             f"got {photo_width}, {footprint}")
        self.max_tilt_deg, self.max_roll_deg = max_tilt_deg, max_roll_deg
        self.photo_width, self.footprint = photo_width, footprint
        self._photos: dict[str, np.ndarray] = {}

    def photo(self, source: str) -> np.ndarray:
        if source not in self._photos:
            # This cache keeps the resized photo; load_photo's own cache would keep the full-size one as well.
            image = load_photo.__wrapped__(source)
            h, w = image.shape[:2]
            pw = self.photo_width
            self._photos[source] = cv2.resize(image, (pw, max(8, round(h * pw / w))),
                                              interpolation=cv2.INTER_AREA if w > pw else cv2.INTER_LINEAR)
        return self._photos[source]

    def pair(self, K: Intrinsics, query: bool, rng: np.random.Generator) -> tuple[View, View]:
        """Two views of one photo around the same point of it, each from its own tilt (up to
        ``max_tilt_deg`` off the normal), side, distance (footprint ``footprint``, by default
        0.35-0.8, of the widest view the photo fills) and roll. Photometric changes as for rendered
        pairs: mild on the first view, on the second mild or, with ``query``, strong."""
        source = self.sources[int(rng.integers(len(self.sources)))]
        photo = self.photo(source)
        ph, pw = photo.shape[:2]
        half = 0.25 * PLANE_WIDTH_M * np.array([1.0, ph / pw])
        target = np.append(rng.uniform(-half, half), 0.0)
        # The widest frontal view that the photo fills (a wide KITTI frame limits it by its height).
        fill_w = min(PLANE_WIDTH_M, PLANE_WIDTH_M * ph / pw * K.width / K.height)
        views = []
        for k in range(2):
            # Footprint width (frontal) = distance * width / fx: pick it as a share of what the photo fills.
            footprint = rng.uniform(*self.footprint) * fill_w
            distance = footprint * K.fx / K.width
            jitter = np.append(rng.normal(0.0, 0.03 * PLANE_WIDTH_M, 2), 0.0)
            T = look_at(target + jitter, rng.uniform(0.0, self.max_tilt_deg), rng.uniform(0.0, 360.0), distance,
                        rng.uniform(-self.max_roll_deg, self.max_roll_deg))
            view = plane_view(photo, K, T, f"{source}#{k}")
            preset = "random_strong" if (query and k == 1) else "random_mild"
            views.append(view.with_image(PRESETS[preset].apply(view.image, rng)))
        return views[0], views[1]
