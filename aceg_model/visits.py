"""Visits: keeping each landmark to the stretch of the mapping sequence it was seeded in.

Mapping poses come from a tracker (SLAM, odometry, KinectFusion for 7-Scenes) whose drift
makes two visits of the same place, tens of seconds apart, disagree by a centimetre or so,
while the poses within one visit agree to a millimetre or two. A landmark triangulated or
optimized across two visits lands at a compromise that neither visit's poses reproject
(on the 7-Scenes kitchen the inliers of its worst query stretch came half from frames 0-99
and half from 600-699, with depths biased by -5 to -7 %; ``models/README.md``). So a landmark
belongs to the mapping views within ``window_s`` seconds of its seed view:

- the plane sweep prefers those views as neighbours (``same_visit``);
- in the optimization, a mapping patch attends only to landmarks of its own visit
  (``visit_masks``), so each visit's landmarks follow that visit's poses;
- localization solves the pose once more on the landmarks of the visit of the mapping view
  nearest the pose it found (``MappingViews.landmarks_near``), so one visit's poses decide.

``window_s = 0`` switches all three off.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aceg_model.frames import Intrinsics
from aceg_model.pnp import PnPConfig, PnPResult, solve_pnp


@dataclass(frozen=True)
class VisitConfig:
    # Seconds of the mapping sequence around a landmark's seed view that it belongs to. Measured
    # on generated room 900011 with 1 cm / 0.3 deg RMS of ground-truth drift (a random walk over
    # its 100 s of frames), 250 queries, three drifts, 5cm/5deg / 10cm/10deg: 57.3 / 84.3 %
    # without visits, 64.4 / 87.6 % with 10 s; without drift 91.6 / 92.0 % and 90.8 / 92.4 %
    # (models/README.md, "Visits"; 10 s was the only window tried). 0 switches visits off.
    window_s: float = 10.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.window_s) or self.window_s < 0:
            raise ValueError(f"visit window_s must be a finite number of seconds >= 0, got {self.window_s}")

    @property
    def enabled(self) -> bool:
        return self.window_s > 0


def same_visit(stamps_I: torch.Tensor, window_s: float) -> torch.Tensor:
    """``I x I`` bool: whether two mapping views are within ``window_s`` seconds of each other."""
    return (stamps_I[:, None] - stamps_I[None, :]).abs() <= window_s


def visit_masks(same_visit_II: torch.Tensor, seed_view_M: torch.Tensor, min_count: int
                ) -> list[torch.Tensor | None] | None:
    """Per mapping view, the landmarks (``M`` bool) its patches may attend to: those seeded in its
    visit (``same_visit_II`` from ``same_visit``); None (all landmarks) where fewer than
    ``min_count`` are, or all are. None instead of the list where every view may attend to all
    (a sequence shorter than a visit)."""
    masks: list[torch.Tensor | None] = []
    for mask in same_visit_II[:, seed_view_M.long()]:
        count = int(mask.sum())
        masks.append(mask if min_count <= count < len(mask) else None)
    return None if all(m is None for m in masks) else masks


@dataclass
class MappingViews:
    """Where and when the mapping images were taken, and each landmark's seed image: what
    localization needs to pick the visit nearest a pose. Stored in the map file."""

    centres_I3: np.ndarray  # camera centres, map (world) frame, metres
    axes_I3: np.ndarray  # optical axes (unit), map frame
    stamps_I: np.ndarray  # seconds (float64: bag stamps are ~1.7e9 s)
    seed_view_M: np.ndarray  # int: the mapping image each landmark was seeded from
    window_s: float

    # Nearest view: metres plus this many metres per radian between the optical axes, so a view
    # 10 cm away looking the same way beats one 2 cm away turned by 30 degrees.
    METRES_PER_RADIAN = 0.5

    def __post_init__(self) -> None:
        I, M = len(self.stamps_I), len(self.seed_view_M)
        if self.centres_I3.shape != (I, 3) or self.axes_I3.shape != (I, 3) or I == 0:
            raise ValueError(f"mapping views: {self.centres_I3.shape} centres, {self.axes_I3.shape} axes, "
                             f"{I} stamps; expected I x 3, I x 3 and I > 0")
        if M and (self.seed_view_M.min() < 0 or self.seed_view_M.max() >= I):
            raise ValueError(f"mapping views: landmark seed views must lie in [0, {I}), "
                             f"got [{self.seed_view_M.min()}, {self.seed_view_M.max()}]")
        if not (np.isfinite(self.centres_I3).all() and np.isfinite(self.axes_I3).all()
                and np.isfinite(self.stamps_I).all()):
            raise ValueError("mapping views: centres, axes and stamps must be finite")
        if not np.isfinite(self.window_s) or self.window_s <= 0:
            raise ValueError(f"mapping views: window_s must be > 0 s, got {self.window_s}")

    @classmethod
    def from_poses(cls, T_world_cam_I44: np.ndarray, stamps_I: np.ndarray, seed_view_M: np.ndarray,
                   window_s: float) -> "MappingViews":
        return cls(T_world_cam_I44[:, :3, 3].copy(), T_world_cam_I44[:, :3, 2].copy(),
                   np.asarray(stamps_I, dtype=np.float64), np.asarray(seed_view_M, dtype=np.int64), window_s)

    def nearest_view(self, T_world_cam: np.ndarray) -> int:
        """The mapping view closest to a camera pose (distance plus turn, ``METRES_PER_RADIAN``)."""
        turn = np.arccos(np.clip(self.axes_I3 @ T_world_cam[:3, 2], -1.0, 1.0))
        return int(np.argmin(np.linalg.norm(self.centres_I3 - T_world_cam[:3, 3], axis=1)
                             + self.METRES_PER_RADIAN * turn))

    def landmarks_near(self, T_world_cam: np.ndarray) -> np.ndarray:
        """``M`` bool: the landmarks seeded within ``window_s`` of the mapping view nearest the pose."""
        t = self.stamps_I[self.nearest_view(T_world_cam)]
        return np.abs(self.stamps_I[self.seed_view_M] - t) <= self.window_s

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the map file (``SceneMap.save``); ``window_s`` goes in its metadata."""
        return {"views.centres": torch.as_tensor(self.centres_I3, dtype=torch.float32),
                "views.axes": torch.as_tensor(self.axes_I3, dtype=torch.float32),
                "views.stamps": torch.as_tensor(self.stamps_I, dtype=torch.float64),
                "landmarks.seed_view": torch.as_tensor(self.seed_view_M, dtype=torch.int32)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], window_s: float, path) -> "MappingViews":
        try:
            return cls(tensors["views.centres"].double().numpy(), tensors["views.axes"].double().numpy(),
                       tensors["views.stamps"].double().numpy(),
                       tensors["landmarks.seed_view"].long().numpy(), float(window_s))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid mapping views: {e}") from None


def solve_in_visit(res: PnPResult, views: MappingViews, best_N: np.ndarray, coords_N3: np.ndarray,
                   pixels_N2: np.ndarray, uncertainty_N: np.ndarray, intrinsics: Intrinsics, config: PnPConfig
                   ) -> tuple[PnPResult, np.ndarray]:
    """An accepted pose solved again on the correspondences whose best landmark (``best_N``)
    belongs to the visit of the mapping view nearest it, and which correspondences those are
    (``N`` bool). ``res`` and all of them where that visit holds fewer than ``min_inliers``
    correspondences or the solve fails: acceptance stays with the first solve."""
    keep = views.landmarks_near(res.T_world_cam)[best_N]
    everything = np.ones(len(best_N), dtype=bool)
    if keep.all() or keep.sum() < config.min_inliers:
        return res, everything
    again = solve_pnp(coords_N3[keep], pixels_N2[keep], intrinsics, config, uncertainty_N=uncertainty_N[keep])
    return (again, keep) if again.success else (res, everything)
