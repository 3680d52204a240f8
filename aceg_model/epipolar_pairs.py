"""Real posed image pairs for the encoder, supervised by their epipolar geometry.

Two photos of a real place taken from known poses say, for each pixel of one, on
which line of the other its match lies (the epipolar line), without any depth.
A loss that asks the best-matching features of the second image to lie on that
line trains the encoder on real parallax and real viewpoint changes of real 3D
structure, which neither the generated scenes (rendered) nor the photo pairs (a
photo on a plane) give it. The idea of training descriptors from camera poses
alone is that of CAPS (Wang et al., ECCV 2020); the loss here is an InfoNCE whose
positives are the cells near the line (``losses.epipolar_nce``).

The sequences are the shared real ones that no checkpoint is chosen on: Strecha
fountain-P11, entry-P10 and castle-P30 and KITTI 01. The tuning sequences
(KITTI 06, Strecha Herz-Jesus-P25) are never read, nor is 7-Scenes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aceg_model.datasets import open_dataset
from aceg_model.frames import Intrinsics
from aceg_model.geometry import skew
from aceg_model.model import prepare_image
from aceg_model.scene.textures import default_shared_data

# Relative to the shared data folder. Not the tuning sequences (photo_pairs.TUNING_SEQUENCES).
EPIPOLAR_SEQUENCES = ("strecha-mvs-gt/fountain-P11", "strecha-mvs-gt/entry-P10", "strecha-mvs-gt/castle-P30",
                      "kitti-odometry-snippets/seq01_frames000-050")


@dataclass(frozen=True)
class PosedImage:
    """A grey image at the working height, its intrinsics and its camera-to-world pose."""

    image_hw: np.ndarray  # float32 in [0, 1]
    intrinsics: Intrinsics
    T_world_cam: np.ndarray
    # The same photo at the fine scale (EpipolarPairs' fine_scale x the height), for the fine term.
    fine: PosedImage | None = None


def fundamental(a: PosedImage, b: PosedImage) -> np.ndarray:
    """F with x_b^T F x_a = 0 for pixels (homogeneous, pixel-centre convention) of a and b."""
    T_ba = np.linalg.inv(b.T_world_cam) @ a.T_world_cam
    return np.linalg.inv(b.intrinsics.K).T @ skew(T_ba[:3, 3]) @ T_ba[:3, :3] @ np.linalg.inv(a.intrinsics.K)


def epipolar_lines(F_33: np.ndarray, uv_a_N2: np.ndarray) -> np.ndarray:
    """Row i: (a, b, c) of the line ax + by + c = 0 in image b on which pixel i of a has its match."""
    return np.c_[uv_a_N2, np.ones(len(uv_a_N2))] @ F_33.T


def lines_in_crop(F_33: np.ndarray, uv_crop_a_N2: np.ndarray, origin_a: np.ndarray, origin_b: np.ndarray) -> np.ndarray:
    """``epipolar_lines`` between crops: pixels of a's crop (its top-left at pixel ``origin_a`` of a)
    -> their lines in the coordinates of b's crop (at ``origin_b``)."""
    lines = epipolar_lines(F_33, uv_crop_a_N2 + origin_a)
    # b's pixel x is x_crop + origin_b: a x + b y + c = a x_crop + b y_crop + (c + a o_x + b o_y).
    lines[:, 2] += lines[:, :2] @ np.asarray(origin_b, dtype=np.float64)
    return lines


def point_line_distances(lines_N3: np.ndarray, uv_N2: np.ndarray) -> np.ndarray:
    """Pixels from point i to line i (a, b, c of ax + by + c = 0)."""
    return np.abs((lines_N3 * np.c_[uv_N2, np.ones(len(uv_N2))]).sum(1)) / np.linalg.norm(lines_N3[:, :2], axis=1)


def line_distances(F_33: np.ndarray, uv_a_N2: np.ndarray, uv_b_N2: np.ndarray) -> np.ndarray:
    """Pixels of b from the epipolar lines of their matches in a."""
    return point_line_distances(epipolar_lines(F_33, uv_a_N2), uv_b_N2)


class EpipolarPairs:
    """Pairs of images ``1..max_gap`` apart in each sequence, loaded once at ``height`` px, and
    with ``fine_scale`` at that many times the height as well (``PosedImage.fine``)."""

    def __init__(self, height: int, data_dir: Path | None = None, max_gap: int = 2,
                 sequences: tuple[str, ...] = EPIPOLAR_SEQUENCES, fine_scale: int | None = None) -> None:
        if max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {max_gap}")
        if fine_scale is not None and fine_scale < 1:
            raise ValueError(f"fine_scale must be >= 1, got {fine_scale}")
        data_dir = Path(data_dir) if data_dir is not None else default_shared_data()
        missing = [s for s in sequences if not (data_dir / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"epipolar pairs: no {', '.join(missing)} under {data_dir}")
        self.images: list[PosedImage] = []
        self.pairs: list[tuple[int, int]] = []
        for seq in sequences:
            first = len(self.images)
            for frame in open_dataset(data_dir / seq):
                fine = None
                if fine_scale is not None:
                    image, K = prepare_image(frame.image, frame.intrinsics, height * fine_scale)
                    fine = PosedImage(image[0].numpy(), K, frame.T_world_cam)
                image, K = prepare_image(frame.image, frame.intrinsics, height)
                self.images.append(PosedImage(image[0].numpy(), K, frame.T_world_cam, fine))
            n = len(self.images) - first
            self.pairs += [(first + i, first + i + g) for g in range(1, max_gap + 1) for i in range(n - g)]
        if not self.pairs:
            raise ValueError(f"epipolar pairs: no two images {max_gap} or fewer apart in {sequences}")

    def pair(self, rng: np.random.Generator) -> tuple[PosedImage, PosedImage]:
        """A random pair, in random order."""
        i, j = self.pairs[rng.integers(len(self.pairs))]
        return (self.images[i], self.images[j]) if rng.random() < 0.5 else (self.images[j], self.images[i])
