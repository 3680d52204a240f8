"""Mapping a new scene: optimize a scene head alone from posed RGB images.

For ACE-G the head is the frozen pre-trained regressor and the trainable part
is the map codes (``heads.CodesHead``), seeded from the mapping images
themselves (``seed_codes``: random patches become landmarks, placed on their
rays at the depth a plane sweep against neighbouring views finds); for the ACE-style baseline it is a
per-scene MLP (``heads.MlpHead``). The encoder is frozen. Features are
computed once per image and cached; every iteration samples patches across
all mapping images (patches are independent), regresses their scene
coordinates and minimizes the reprojection NLL under the known mapping poses
(``losses.reprojection_nll``). No depth is used.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from aceg_model.camera_mount import CameraMount
from aceg_model.encoder import patch_centres
from aceg_model.frames import Frame, Intrinsics
from aceg_model.geometry import invert
from aceg_model.heads import CodesHead, MlpHead
from aceg_model.landmarks import SweepConfig, SweepViews, neighbour_views, sweep_depths
from aceg_model.lens import CorrectedFrames, LensConfig, LensEstimate, RadialDistortion, estimate_lens, frame_pose
from aceg_model.losses import ReprojectionLossConfig, pixel_rays, reprojection_nll
from aceg_model.map_consistency import ConsistencyConfig, ConsistencyReport, map_consistency
from aceg_model.model import AcegModel, prepare_image
from aceg_model.photo_depth import (GreyViews, LandmarkWindows, PhotoDepthConfig, grey_image, landmark_windows,
                                    refine_depths)
from aceg_model.pixel_refinement import encode_fine, refine_pixels
from aceg_model.pnp import PnPConfig
from aceg_model.pose_check import PoseCheck, PoseCheckConfig, check_poses
from aceg_model.pose_refinement import PosedFrames, PoseRefinement, PoseRefinementConfig, refine_poses
from aceg_model.visits import MappingViews, VisitConfig, same_visit, visit_masks

MAP_KIND = "aceg-map"
MIN_MAPPING_FRAMES = 3
METHODS = ("aceg", "ace")

Progress = Callable[[str, int, int, dict], None]
T = TypeVar("T")


@dataclass
class MappingConfig:
    method: str = "aceg"  # 'aceg' (map codes) or 'ace' (per-scene MLP baseline)
    iterations: int = 300  # ~0.03 s each on the 2-core CPU at the default batch, plus the candidate refreshes
    batch_patches: int = 4096
    # Seeded landmarks start close (plane sweep), so small steps: at 0.02 m the first
    # iterations undid the sweep (generated room 900001: 5 mm steps gave the best inlier ratio).
    # With the sweep at 3x resolution the seeds are closer still (median 3.3 cm from the surface
    # on room 900001); 300 iterations at 5 mm moved them to 4.4 cm, at 1 mm to 3.6 cm, and four
    # generated rooms localized 66.3 / 88.8 % against 64.4 / 87.8 % (models/README.md).
    lr_keys: float = 0.005  # Adam on the landmark keys (compared by cosine, so unitless)
    lr_positions: float = 0.001  # Adam on the landmark positions, metres per step at most
    lr_ace: float = 1e-3  # the MLP baseline's Adam learning rate
    lr_final_frac: float = 0.05  # cosine decay to this fraction
    # ACE-G: iterations between searches of every mapping patch's top-k landmarks; in between,
    # a patch attends to the landmarks found at the last search (their keys and positions live).
    # The search is ~3/4 of an iteration's time. 0: search at every iteration.
    candidate_refresh: int = 150
    # ACE-G with fine keys: at each candidate refresh, move every mapping patch's pixel within its
    # patch to where its best landmark's fine key matches best in that image
    # (``aceg_model.pixel_refinement``), so the reprojection loss compares landmarks with where
    # they are seen rather than with patch centres. Window in working-resolution pixels. Runs at
    # the refreshes only: with candidate_refresh 0 the pixels stay the patch centres.
    refine_pixels: bool = True
    refine_window_px: int = 6
    seed: int = 0
    encode_batch: int = 8  # images per encoder call when caching features
    sweep_seeds: bool = True  # landmark depths from a plane sweep (False: all at loss.target_depth)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # The sweep's depths sharpened by NCC of the mapping images' raw pixels (``photo_depth``).
    photo_depth: PhotoDepthConfig = field(default_factory=PhotoDepthConfig)
    # The lens's radial distortion, estimated from the posed mapping images and removed from
    # them and from the queries (``aceg_model.lens``); zero for a pinhole camera. With it, the
    # camera's mount on its pose frame (``aceg_model.camera_mount``); none where the poses are
    # the camera's.
    lens: LensConfig = field(default_factory=LensConfig)
    # Whether the poses agree with the images, pair by pair a moment apart; reported, not
    # corrected (``aceg_model.pose_check``).
    pose_check: PoseCheckConfig = field(default_factory=PoseCheckConfig)
    # The poses corrected from the images before anything is triangulated from them: an epipolar
    # bundle adjustment of matched image pairs (``aceg_model.pose_refinement``).
    pose_refinement: PoseRefinementConfig = field(default_factory=PoseRefinementConfig)
    # Each landmark kept to the stretch of the mapping sequence it was seeded in, so that the drift
    # between two visits of a place does not blur it (``aceg_model.visits``; ACE-G only).
    visits: VisitConfig = field(default_factory=VisitConfig)
    # Measure how the visits' poses disagree, by localizing some mapping images against the other
    # visits' landmarks, and keep it as the floor of every pose covariance (``aceg_model.map_consistency``).
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    loss: ReprojectionLossConfig = field(default_factory=ReprojectionLossConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.iterations <= 0 or self.batch_patches <= 0:
            raise ValueError("iterations and batch_patches must be > 0")
        if self.refine_window_px < 1:
            raise ValueError(f"refine_window_px must be >= 1 px, got {self.refine_window_px}")
        if self.candidate_refresh < 0:
            raise ValueError(f"candidate_refresh must be >= 0 (0: search every iteration), got {self.candidate_refresh}")


def mapping_config(*, method: str = "aceg", iterations: int = MappingConfig.iterations,
                   batch_patches: int = MappingConfig.batch_patches, sweep_seeds: bool = True,
                   sweep_scale: int = SweepConfig.scale, photo_depth: bool = True, estimate_lens: bool = True,
                   estimate_mount: bool = True, visit_window_s: float = VisitConfig.window_s,
                   check_poses: bool = True,
                   refine_poses: bool = PoseRefinementConfig.enabled) -> MappingConfig:
    """A ``MappingConfig`` from the flat options the tools offer (``aceg-map``, ``aceg-eval``, the
    node's ``mapping.*`` parameters); the rest keep their defaults. ValueError if invalid."""
    return MappingConfig(method=method, iterations=iterations, batch_patches=batch_patches, sweep_seeds=sweep_seeds,
                         sweep=SweepConfig(scale=sweep_scale), photo_depth=PhotoDepthConfig(enabled=photo_depth),
                         lens=LensConfig(estimate=estimate_lens, estimate_mount=estimate_mount),
                         visits=VisitConfig(window_s=visit_window_s),
                         pose_check=PoseCheckConfig(enabled=check_poses),
                         pose_refinement=PoseRefinementConfig(enabled=refine_poses))


def make_head(model: AcegModel, method: str, seed: int = 0) -> torch.nn.Module:
    """A fresh scene head of ``method`` on ``model``'s device (random codes / random MLP)."""
    gen = torch.Generator().manual_seed(seed)
    if method == "aceg":
        head = CodesHead(model.regressor, model.regressor.init_codes(1, gen)[0])
    elif method == "ace":
        torch.manual_seed(seed)
        head = MlpHead(model.config.encoder.out_dim)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return head.to(model.device)


@dataclass
class FineKeys:
    """Each landmark's descriptor at its pixel in its mapping image encoded at ``scale`` x the
    working resolution (unit rows, float16): what the query's sub-patch refinement looks for
    (``aceg_model.pixel_refinement``). Row m belongs to landmark m."""

    keys_MK: torch.Tensor
    scale: int


@dataclass(frozen=True)
class MappingLens:
    """The radial distortion mapping found for its camera, removed from query images of that
    camera (same intrinsics) before they are localized, and the camera's mount on the frame the
    mapping poses described: poses of that camera's queries are returned in that frame."""

    camera: Intrinsics
    distortion: RadialDistortion
    mount: CameraMount = field(default_factory=CameraMount)

    def to_meta(self) -> dict:
        c = self.camera
        return {"k1": self.distortion.k1, "k2": self.distortion.k2,
                "camera": [c.fx, c.fy, c.cx, c.cy, c.width, c.height], "mount": self.mount.to_meta()}

    @classmethod
    def from_meta(cls, meta: dict, path) -> "MappingLens":
        try:
            fx, fy, cx, cy, w, h = meta["camera"]
            # Maps from before the mount was estimated have none.
            mount = CameraMount.from_meta(meta["mount"]) if "mount" in meta else CameraMount()
            lens = cls(Intrinsics(float(fx), float(fy), float(cx), float(cy), int(w), int(h)),
                       RadialDistortion(float(meta["k1"]), float(meta["k2"])), mount)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid lens metadata {meta!r}: {e}") from None
        if max(abs(lens.distortion.k1), abs(lens.distortion.k2)) > 1.0:
            raise ValueError(f"{path}: lens distortion {lens.distortion} is out of range (|k| <= 1)")
        return lens

    def applies_to(self, intrinsics: Intrinsics) -> bool:
        return intrinsics == self.camera


@dataclass
class SceneMap:
    """A mapped scene: its head (codes or MLP), the map centre (scene coords are relative to it)
    and, for landmark maps seeded by a fine plane sweep, the landmarks' fine keys and, where the
    sweep's depths were sharpened on the raw pixels, the landmarks' grey windows; where mapping
    found its camera's lens distorted, that distortion (``lens``); where mapping kept landmarks
    to visits, where and when its images were taken and each landmark's seed image (``views``)."""

    head: torch.nn.Module
    centre_3: np.ndarray
    meta: dict = field(default_factory=dict)
    fine: FineKeys | None = None
    windows: LandmarkWindows | None = None
    lens: MappingLens | None = None
    views: MappingViews | None = None
    # 6x6 covariance of how the map's visits disagree (``aceg_model.map_consistency``), which the
    # localizer adds to every pose's covariance; None where mapping could not measure it.
    floor_66: np.ndarray | None = None

    @property
    def method(self) -> str:
        return self.head.method

    def predict(self, feats_bF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scene coordinates in the map (world) frame and log sigma for patch features."""
        coords_b3, log_sigma_b = self.head(feats_bF)
        return coords_b3 + self._centre_like(coords_b3), log_sigma_b

    def predict_with_candidates(self, feats_bF: torch.Tensor, allowed_M: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``predict`` plus the indices (``b x k``) of the landmarks each patch's attention chose
        among, the best-matching one first; None for a head without landmarks (the MLP baseline).
        With ``allowed_M`` (bool, one per landmark) among those landmarks only."""
        if not isinstance(self.head, CodesHead) or not self.head.regressor.uses_top_k(len(self.head.keys)):
            if allowed_M is not None:
                raise ValueError("only a landmark map can be searched among some of its landmarks")
            return (*self.predict(feats_bF), None)
        candidates_bk = self.head.candidates(feats_bF, best_first=True, allowed_M=allowed_M)
        coords_b3, log_sigma_b = self.head(feats_bF, candidates_bk)
        return coords_b3 + self._centre_like(coords_b3), log_sigma_b, candidates_bk

    def landmark_positions(self, index: torch.Tensor) -> torch.Tensor:
        """Positions (map frame) of the landmarks at ``index`` (any shape; adds a trailing 3)."""
        positions = self.head.positions[index]
        return positions + self._centre_like(positions)

    def _centre_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.centre_3, dtype=x.dtype, device=x.device)

    def save(self, path) -> None:
        from aceg_model.safe_files import save_tensors

        tensors = {f"head.{k}": v for k, v in self.head.scene_tensors().items()}
        tensors["centre"] = torch.as_tensor(self.centre_3, dtype=torch.float64)
        meta = {**self.meta, "method": self.method}
        meta.pop("fine_scale", None)
        meta.pop("window_radius_px", None)
        meta.pop("window_scale", None)
        meta.pop("lens", None)
        meta.pop("visit_window_s", None)
        meta.pop("map_floor", None)
        if self.floor_66 is not None:
            meta["map_floor"] = np.asarray(self.floor_66, dtype=np.float64).tolist()
        if self.views is not None:
            tensors.update(self.views.tensors())
            meta["visit_window_s"] = self.views.window_s
        if self.lens is not None:
            meta["lens"] = self.lens.to_meta()
        if self.fine is not None:
            tensors["fine_keys"] = self.fine.keys_MK.detach().to("cpu", torch.float16).contiguous()
            meta["fine_scale"] = self.fine.scale
        if self.windows is not None:
            tensors["window_grey"] = self.windows.grey_MW.detach().to("cpu", torch.uint8).contiguous()
            tensors["window_axes"] = self.windows.axes_M23.detach().to("cpu", torch.float32).contiguous()
            meta["window_radius_px"] = self.windows.radius_px
            meta["window_scale"] = self.windows.scale
        save_tensors(path, tensors, meta, kind=MAP_KIND)

    @classmethod
    def load(cls, path, model: AcegModel) -> "SceneMap":
        """Load a map and check it was made with ``model`` (same hash, same tensor shapes)."""
        from aceg_model.safe_files import read_meta, load_tensors

        header = read_meta(path, kind=MAP_KIND)
        method = header.get("method")
        if method not in METHODS:
            raise ValueError(f"{path}: unknown map method {method!r}; expected one of {METHODS}")
        head = make_head(model, method)
        shapes = {f"head.{k}": tuple(v.shape) for k, v in head.scene_tensors().items()}
        shapes["centre"] = (3,)
        fine_scale = header.get("fine_scale")
        if fine_scale is not None:  # maps made before fine keys, or with a scale-1 sweep, have none
            if method != "aceg" or not isinstance(fine_scale, int) or isinstance(fine_scale, bool) or fine_scale < 2:
                raise ValueError(f"{path}: invalid fine_scale {fine_scale!r} for a {method!r} map")
            shapes["fine_keys"] = (model.config.regressor.n_codes, model.config.regressor.key_dim)
        radius, window_scale = header.get("window_radius_px"), header.get("window_scale")
        if radius is not None or window_scale is not None:  # maps made before windows have none
            if method != "aceg" or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16
                                           for v in (radius, window_scale)):
                raise ValueError(f"{path}: invalid window_radius_px {radius!r} / window_scale {window_scale!r} "
                                 f"for a {method!r} map")
            shapes["window_grey"] = (model.config.regressor.n_codes, (2 * radius + 1) ** 2)
            shapes["window_axes"] = (model.config.regressor.n_codes, 2, 3)
        window_s = header.get("visit_window_s")
        if window_s is not None:  # maps made before visits, or without them, have none
            if method != "aceg" or not isinstance(window_s, (int, float)) or isinstance(window_s, bool):
                raise ValueError(f"{path}: invalid visit_window_s {window_s!r} for a {method!r} map")
            shapes.update({"landmarks.seed_view": (model.config.regressor.n_codes,), "views.centres": (None, 3),
                           "views.axes": (None, 3), "views.stamps": (None,)})
        tensors, meta = load_tensors(path, kind=MAP_KIND, expected_shapes=shapes,
                                     expected_meta={"model_hash": model.model_hash()})
        head.load_scene_tensors({k[5:]: v.to(model.device) for k, v in tensors.items() if k.startswith("head.")})
        fine = None if fine_scale is None else FineKeys(tensors["fine_keys"].to(model.device), fine_scale)
        windows = None
        if radius is not None:
            windows = LandmarkWindows(tensors["window_grey"].to(model.device, torch.uint8),
                                      tensors["window_axes"].to(model.device, torch.float32), radius, window_scale)
        lens = None if meta.get("lens") is None else MappingLens.from_meta(meta["lens"], path)
        views = None if window_s is None else MappingViews.from_tensors(tensors, window_s, path)
        floor = None if meta.get("map_floor") is None else checked_floor(meta["map_floor"], path)
        return cls(head.eval(), tensors["centre"].numpy().astype(np.float64), meta, fine, windows, lens, views, floor)


def checked_floor(value, path) -> np.ndarray:
    """A map file's covariance floor as a 6x6 array; ValueError unless finite, symmetric and PSD."""
    try:
        floor = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        floor = np.zeros(0)
    if floor.shape != (6, 6) or not np.isfinite(floor).all() or not np.allclose(floor, floor.T, atol=1e-12) \
            or np.linalg.eigvalsh(floor)[0] < -1e-12:
        raise ValueError(f"{path}: invalid map_floor: need a finite, symmetric, positive semi-definite 6x6 matrix")
    return floor


@dataclass
class MappingReport:
    method: str
    n_frames: int
    n_patches: int
    iterations: int
    final_loss: float
    final_median_px: float
    final_valid: float
    seconds_encode: float
    seconds_seed: float  # placing the landmarks (plane sweep); 0 for the MLP baseline
    seconds_optimize: float
    lens: LensEstimate | None = None  # None when the estimate was switched off
    pose_check: PoseCheck | None = None  # None when the check was switched off
    consistency: ConsistencyReport | None = None  # None when switched off or without visits
    pose_refinement: PoseRefinement | None = None  # None when switched off

    @property
    def seconds(self) -> float:
        return (self.seconds_encode + self.seconds_seed + self.seconds_optimize
                + (self.lens.seconds if self.lens else 0) + (self.pose_check.seconds if self.pose_check else 0)
                + (self.consistency.seconds if self.consistency else 0)
                + (self.pose_refinement.seconds_match + self.pose_refinement.seconds_solve
                   if self.pose_refinement else 0))


@dataclass
class FeatureCache:
    """Per-patch features and geometry of all mapping images, computed once."""

    feats_NF: torch.Tensor  # float16: half the memory, and the head's LayerNorm absorbs the rounding
    pixels_N2: torch.Tensor  # working-resolution pixel centres
    image_idx_N: torch.Tensor
    T_cam_map_I44: torch.Tensor  # per image, relative to the map centre
    K_I33: torch.Tensor
    grid_hw: tuple[int, int]  # the patch grid of every image (mapping images share one size)
    sweep_views: SweepViews | None = None  # what the plane sweep compares (ACE-G seeding only)
    grey_views: GreyViews | None = None  # the raw pixels that sharpen the sweep's depths
    stamps_I: torch.Tensor | None = None  # per image, seconds (float64)


@torch.inference_mode()
def cache_features(model: AcegModel, frames: Sequence[Frame], centre_3: np.ndarray, batch: int = 8,
                   progress: Progress | None = None, sweep_scale: int | None = None,
                   grey_scale: int | None = None) -> FeatureCache:
    """Encode every mapping image once; with ``sweep_scale`` also the keys the plane sweep
    compares, with ``grey_scale`` the grey pixels that sharpen its depths."""
    device = model.device
    feats, pixels, idx, poses, Ks, stamps = [], [], [], [], [], []
    greys, grey_Ks = [], []
    sweep_keys, sweep_Ks, sweep_hw = [], [], None
    T_world_map = np.eye(4)
    T_world_map[:3, 3] = centre_3
    for start in range(0, len(frames), batch):
        chunk = [frames[i] for i in range(start, min(start + batch, len(frames)))]
        prepared = [prepare_image(f.image, f.intrinsics, model.config.image_height) for f in chunk]
        sizes = {tuple(img.shape) for img, _ in prepared}
        if len(sizes) != 1:
            raise ValueError(f"mapping images must share one size, got {sorted(sizes)}")
        feats_BDhw = model.encoder(torch.stack([img for img, _ in prepared]).to(device))
        B, D, h, w = feats_BDhw.shape
        centres_P2 = patch_centres(h, w, device)
        for i, (frame, (_, K)) in enumerate(zip(chunk, prepared)):
            feats.append(feats_BDhw[i].flatten(1).T.half())
            pixels.append(centres_P2)
            idx.append(torch.full((h * w,), start + i, dtype=torch.long, device=device))
            poses.append(invert(frame.T_world_cam) @ T_world_map)  # T_cam_map
            Ks.append(K.K)
            stamps.append(frame.stamp)
            # The sweep compares the regressor's keys, where landmarks will be matched (64 dims, not 128):
            # at scale 1 those of the working-resolution features themselves.
            if sweep_scale == 1:
                sweep_keys.append(model.regressor.queries(feats[-1].float().unsqueeze(0))[1][0].half())
                sweep_Ks.append(K.K)
                sweep_hw = (h, w)
            elif sweep_scale:
                keys_PK, sweep_hw, K_sweep = encode_fine(model, frame.image, frame.intrinsics, sweep_scale)
                sweep_keys.append(keys_PK.half())
                sweep_Ks.append(K_sweep.K)
            if grey_scale:
                grey, K_grey = grey_image(frame.image, frame.intrinsics, model.config.image_height, grey_scale)
                greys.append(grey.to(device))
                grey_Ks.append(K_grey.K)
        if progress:
            progress("encode", start + len(chunk), len(frames), {})
    T_cam_map_I44 = torch.as_tensor(np.stack(poses), dtype=torch.float32, device=device)
    views = None
    if sweep_scale:
        views = SweepViews(torch.stack(sweep_keys), sweep_hw,
                           torch.as_tensor(np.stack(sweep_Ks), dtype=torch.float32, device=device),
                           T_cam_map_I44, sweep_scale)
    grey_views = None
    if grey_scale:
        grey_views = GreyViews(torch.stack(greys), torch.as_tensor(np.stack(grey_Ks), dtype=torch.float32,
                                                                    device=device), grey_scale)
    return FeatureCache(
        torch.cat(feats), torch.cat(pixels), torch.cat(idx), T_cam_map_I44,
        torch.as_tensor(np.stack(Ks), dtype=torch.float32, device=device), (h, w), views, grey_views,
        torch.as_tensor(stamps, dtype=torch.float64, device=device),
    )


@torch.no_grad()
def seed_codes(model: AcegModel, cache: FeatureCache, depth_m: float, gen: torch.Generator,
               sweep: SweepConfig | None = None, progress: Progress | None = None,
               photo: PhotoDepthConfig | None = None, same_visit_II: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Initial codes from the mapping images alone: patches drawn across all images become
    landmarks, keyed by their own features and placed on their viewing rays. Also returns each
    landmark's fine key (``M x K``, unit) for the query's sub-patch refinement
    (``aceg_model.pixel_refinement``) when the sweep ran at a finer scale than the working one,
    else None, and the mapping image each landmark was seeded from.

    With ``sweep`` each landmark's depth comes from a plane sweep against neighbouring mapping
    views (``aceg_model.landmarks``), and of ``sweep.oversample`` x M candidates the M with the
    sharpest sweep are kept; without it (or where the sweep finds nothing) landmarks sit at
    ``depth_m``. With ``photo`` (enabled) the swept depths are then sharpened by NCC of the
    mapping images' raw pixels (``aceg_model.photo_depth``; needs the cache's grey views), against
    the sweep's neighbours or, with ``photo.n_wide``, a set with its own share of wide ones.
    With ``same_visit_II`` (``visits.same_visit`` of the cache's stamps) the sweep's neighbours
    come from the seed image's own visit first. The reprojection loss then refines
    them from every view whose patches attend."""
    M, n = model.config.regressor.n_codes, len(cache.feats_NF)
    n_cand = M if sweep is None else int(M * sweep.oversample)
    sel = torch.randperm(n, generator=gen)[:n_cand] if n >= n_cand else torch.randint(n, (n_cand,), generator=gen)
    sel = sel.to(cache.feats_NF.device)
    depth = torch.full((len(sel),), depth_m, device=sel.device)
    if sweep is not None:
        if cache.sweep_views is None or cache.sweep_views.scale != sweep.scale:
            raise ValueError(f"the feature cache holds no sweep views at scale {sweep.scale} "
                             f"(cache_features(..., sweep_scale={sweep.scale}))")
        neighbours_In = neighbour_views(cache.T_cam_map_I44, sweep, same_visit_II)  # the sweep's (and the NCC step's)
        # A scene with fewer patches than landmarks draws patches more than once: depths are found
        # per distinct patch (``patches``; candidate i is patch ``again[i]``).
        patches, again = sel.unique(return_inverse=True)
        swept_U, sharpness_U = sweep_depths(cache.sweep_views, cache.image_idx_N[patches], cache.pixels_N2[patches],
                                            sweep, progress and (lambda done, total: progress("seed", done, total, {})),
                                            neighbours_In)
        keep = sharpness_U[again].argsort(descending=True)[:M]
        sel, again = sel[keep], again[keep]
        if photo is not None and photo.enabled:
            if cache.grey_views is None or cache.grey_views.scale != photo.scale:
                raise ValueError(f"the feature cache holds no grey views at scale {photo.scale} "
                                 f"(cache_features(..., grey_scale={photo.scale}))")
            kept_U, again = again.unique(return_inverse=True)  # only the kept patches are sharpened
            patches = patches[kept_U]
            if photo.n_wide is not None and photo.n_wide != sweep.n_wide:
                neighbours_In = neighbour_views(cache.T_cam_map_I44, replace(sweep, n_wide=photo.n_wide), same_visit_II)
            swept_U, _ = refine_depths(cache.grey_views, cache.T_cam_map_I44, neighbours_In, cache.image_idx_N[patches],
                                       cache.pixels_N2[patches], swept_U[kept_U], photo)
        swept = swept_U[again]
        depth = torch.where(swept.isfinite(), swept, depth[keep])
    img = cache.image_idx_N[sel]
    rays_M3 = pixel_rays(cache.K_I33[img], cache.pixels_N2[sel])
    T_map_cam_M44 = torch.linalg.inv(cache.T_cam_map_I44[img])
    pos_M3 = (torch.einsum("mij,mj->mi", T_map_cam_M44[:, :3, :3], rays_M3 * depth[:, None])
              + T_map_cam_M44[:, :3, 3])
    fine_keys_MK = None
    if sweep is not None and sweep.scale > 1:
        views = cache.sweep_views
        fine_keys_MK = F.normalize(views.sample(img, views.to_sweep_pixels(cache.pixels_N2[sel])), dim=-1)
    return model.regressor.seed_codes(cache.feats_NF[sel].float(), pos_M3), fine_keys_MK, img


def all_candidates(head: CodesHead, feats_NF: torch.Tensor, chunk: int, best_first: bool = False,
                   masks: list[torch.Tensor | None] | None = None, rows_R: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``N x k`` indices of the landmarks every mapping patch attends to with the codes as they
    are (with ``best_first``, the best-matching in column 0). With ``masks`` (one per image, from
    ``visits.visit_masks``) the patches of image i choose among the landmarks ``masks[i]`` allows;
    ``feats_NF`` is then image-major with as many patches per image (as ``FeatureCache``).
    With ``rows_R`` (sorted patch indices) only those rows are searched; the others are -1."""
    # int32: half the memory (600 000 patches x 16 of redkitchen's 500 frames: 38 MB)
    if rows_R is None:
        rows_R = torch.arange(len(feats_NF), device=feats_NF.device)
    k = head.regressor.config.attention_top_k
    out_Nk = torch.full((len(feats_NF), k), -1, dtype=torch.int32, device=feats_NF.device)
    if masks is None:
        for r in rows_R.split(chunk):
            out_Nk[r] = head.candidates(feats_NF[r].float(), best_first).int()
        return out_Nk
    for r, mask in zip(rows_by_image(rows_R, len(masks), len(feats_NF) // len(masks)), masks):
        if len(r):
            out_Nk[r] = head.candidates(feats_NF[r].float(), best_first, mask).int()
    return out_Nk


def rows_by_image(rows_R: torch.Tensor, n_images: int, per_image: int) -> list[torch.Tensor]:
    """Sorted patch indices of an image-major cache (``per_image`` patches each), split by image:
    one tensor per image, empty where none of its patches is among them."""
    bounds = torch.searchsorted(rows_R, torch.arange(n_images + 1, device=rows_R.device) * per_image).tolist()
    return [rows_R[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def refined_pixels(cache: FeatureCache, fine: FineKeys, best_N: torch.Tensor, window_px: int,
                   rows_R: torch.Tensor | None = None) -> torch.Tensor:
    """Every mapping patch's pixel (working resolution) moved to where the fine key of its best
    landmark ``best_N`` matches best in its own image, on the sweep's fine descriptors. With
    ``rows_R`` (sorted patch indices) only those patches move; the others keep their centres."""
    views = cache.sweep_views
    if views is None or views.scale != fine.scale:
        raise ValueError(f"refining mapping pixels needs the sweep's descriptors at scale {fine.scale}")
    per_image = cache.grid_hw[0] * cache.grid_hw[1]  # the cache is image-major
    if rows_R is None:
        rows_R = torch.arange(len(cache.pixels_N2), device=cache.pixels_N2.device)
    out = cache.pixels_N2.clone()
    for i, rows in enumerate(rows_by_image(rows_R, len(views.desc_IPD), per_image)):
        if len(rows):
            out[rows], _ = refine_pixels(fine.keys_MK[best_N[rows].long()], views.desc_IPD[i], views.hw, fine.scale,
                                         cache.pixels_N2[rows], window_px)
    return out


@dataclass
class CameraPreparation:
    """What mapping finds out about its camera before it maps (``prepare_cameras``): the lens and
    mount, how the poses agree with the images, and the poses corrected from them. It depends on
    the frames and the mapping config's ``lens``, ``pose_check`` and ``pose_refinement`` alone, so
    one preparation serves every method mapped from the same frames (``aceg-eval --baseline``)."""

    n_frames: int
    lens_estimate: LensEstimate | None  # None when the estimate was switched off
    lens: MappingLens | None  # what the map keeps: None when neither lens nor mount was accepted
    pose_check: PoseCheck | None
    refinement: PoseRefinement | None

    @property
    def seconds(self) -> float:
        r = self.refinement
        return ((self.lens_estimate.seconds if self.lens_estimate else 0.0)
                + (self.pose_check.seconds if self.pose_check else 0.0)
                + (r.seconds_match + r.seconds_solve if r else 0.0))

    def apply(self, frames: Sequence[Frame]) -> tuple[Sequence[Frame], Sequence[Frame]]:
        """``frames`` at the corrected poses where the refinement was kept (``given``: what a query
        of that camera looks like), and those with the lens removed and the mount applied (what
        mapping fits to)."""
        given = frames
        if self.refinement is not None and self.refinement.accepted:  # back in the pose frame
            T_camera_pose = np.linalg.inv(self.lens.mount.T_pose_camera) if self.lens else np.eye(4)
            given = PosedFrames(frames, self.refinement.poses_I44 @ T_camera_pose)
        if self.lens is None:
            return given, given
        return given, CorrectedFrames(given, self.lens.distortion, self.lens.mount)


def prepare_cameras(frames: Sequence[Frame], config: MappingConfig | None = None,
                    progress: Progress | None = None) -> CameraPreparation:
    """Estimate the lens (and mount), check the poses against the images and correct them, as
    ``config`` asks: the stages of mapping before the images are encoded."""
    cfg = config or MappingConfig()
    lens_estimate, lens = None, None
    if cfg.lens.estimate:
        lens_estimate = _stage(progress, "lens", lambda: estimate_lens(frames, cfg.lens),
                               lambda e: {"k1": e.distortion.k1, "k2": e.distortion.k2,
                                          "mount_deg": e.mount.angle_deg, "mount_cm": 100 * e.mount.offset_m,
                                          "reason": e.reason})
        if lens_estimate.accepted or lens_estimate.mount_accepted:
            lens = MappingLens(frames[0].intrinsics, lens_estimate.distortion, lens_estimate.mount)
    # The camera's poses, through its mount; the check and the refinement remove the lens themselves.
    cameras = frames if lens is None else CorrectedFrames(frames, RadialDistortion(), lens.mount)
    pose_check = None
    if cfg.pose_check.enabled:
        pose_check = _stage(progress, "pose check",
                            lambda: check_poses(cameras, lens.distortion if lens else None, cfg.pose_check),
                            lambda c: {"median_px": c.median_px, "flagged": len(c.flagged)})
    refinement = None
    if cfg.pose_refinement.enabled:
        refinement = _stage(progress, "pose refinement",
                            lambda: refine_poses(cameras, lens.distortion if lens else None, cfg.pose_refinement),
                            lambda r: {"pairs": r.n_pairs, "moved_mm": r.median_move_mm, "px_after": r.median_px_after})
    return CameraPreparation(len(frames), lens_estimate, lens, pose_check, refinement)


def map_scene(model: AcegModel, frames: Sequence[Frame], config: MappingConfig | None = None,
              progress: Progress | None = None, pnp: PnPConfig | None = None,
              cameras: CameraPreparation | None = None) -> tuple[SceneMap, MappingReport]:
    """Fit a scene head to ``frames`` (posed RGB + intrinsics). ``progress(stage, done, total, stats)``.

    ``pnp``: the localizer settings the map will be used with; the map's floor is measured with
    them (``map_consistency``; default ``PnPConfig()``). ``cameras``: a ``prepare_cameras`` of
    these frames to use instead of making one (another method's map of the same frames).
    """
    cfg = config or MappingConfig()
    if len(frames) < MIN_MAPPING_FRAMES:
        raise ValueError(f"mapping needs at least {MIN_MAPPING_FRAMES} posed frames, got {len(frames)}")
    model.eval().requires_grad_(False)
    # The map frame is the scene frame shifted to the mean camera centre, so the
    # head works with room-sized offsets whatever the scene's origin.
    centre_3 = np.mean([frame_pose(frames, i)[:3, 3] for i in range(len(frames))], axis=0)

    if cameras is None:
        cameras = prepare_cameras(frames, cfg, progress)
    elif cameras.n_frames != len(frames):
        raise ValueError(f"the camera preparation was made for {cameras.n_frames} frames, not these {len(frames)}")
    lens, refinement = cameras.lens, cameras.refinement
    given, frames = cameras.apply(frames)

    t0 = time.perf_counter()
    sweep_scale = cfg.sweep.scale if cfg.method == "aceg" and cfg.sweep_seeds else None
    grey_scale = cfg.photo_depth.scale if sweep_scale and cfg.photo_depth.enabled else None
    cache = cache_features(model, frames, centre_3, cfg.encode_batch, progress, sweep_scale, grey_scale)
    t_encode = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(cfg.seed)
    keep_visits = cfg.method == "aceg" and cfg.visits.enabled
    visit_II = same_visit(cache.stamps_I, cfg.visits.window_s) if keep_visits else None
    t_seed = time.perf_counter()
    if cfg.method == "aceg":
        codes, fine_keys_MK, seed_images_M = seed_codes(model, cache, cfg.loss.target_depth, gen,
                                                        cfg.sweep if cfg.sweep_seeds else None, progress,
                                                        cfg.photo_depth, visit_II)
        head = CodesHead(model.regressor, codes).train()
        groups = [{"params": [head.keys], "lr": cfg.lr_keys}, {"params": [head.positions], "lr": cfg.lr_positions}]
    else:
        head, fine_keys_MK, seed_images_M = make_head(model, cfg.method, cfg.seed).train(), None, None
        groups = [{"params": list(head.parameters()), "lr": cfg.lr_ace}]
    opt = torch.optim.Adam(groups)
    t_seed = time.perf_counter() - t_seed
    sched = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to lr_final_frac of each group's rate
        opt, lambda it: cfg.lr_final_frac + (1 - cfg.lr_final_frac) * 0.5 * (1 + math.cos(math.pi * it / cfg.iterations)))
    n = len(cache.feats_NF)
    loss_val, stats = float("nan"), {"valid": float("nan"), "median_px": float("nan")}
    refresh = cfg.candidate_refresh if cfg.method == "aceg" and model.regressor.uses_top_k(len(head.keys)) else 0
    candidates_Nk = None
    fine = None if fine_keys_MK is None else FineKeys(fine_keys_MK.half(), cfg.sweep.scale)
    refine = cfg.refine_pixels and fine is not None
    pixels_N2 = cache.pixels_N2
    masks = None
    if refresh and keep_visits:  # each mapping image's patches attend to the landmarks of its visit
        masks = visit_masks(visit_II, seed_images_M, model.regressor.config.attention_top_k)
    t1 = time.perf_counter()
    batches: list[torch.Tensor] = []

    def draw() -> torch.Tensor:
        return torch.randint(n, (min(cfg.batch_patches, n),), generator=gen)

    for it in range(cfg.iterations):
        if refresh and it % refresh == 0:
            # The batches until the next refresh are drawn now (the same draws, in the same order),
            # so that only the patches they hold are searched: with the kitchen's 600 000 patches
            # a period of 150 x 4096 draws holds 64 % of them.
            batches = [draw() for _ in range(min(refresh, cfg.iterations - it))][::-1]
            drawn_R = torch.unique(torch.cat(batches)).to(model.device)
            candidates_Nk = all_candidates(head, cache.feats_NF, cfg.batch_patches, refine, masks, drawn_R)
            if refine:
                pixels_N2 = refined_pixels(cache, fine, candidates_Nk[:, 0], cfg.refine_window_px, drawn_R)
        sel = (batches.pop() if batches else draw()).to(model.device)
        img = cache.image_idx_N[sel]
        feats_bF = cache.feats_NF[sel].float()
        if candidates_Nk is None:
            coords_b3, log_sigma_b = head(feats_bF)
        else:
            coords_b3, log_sigma_b = head(feats_bF, candidates_Nk[sel].long())
        loss, stats = reprojection_nll(coords_b3, log_sigma_b, pixels_N2[sel], cache.T_cam_map_I44[img],
                                       cache.K_I33[img], it / cfg.iterations, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_val = loss.item()
        if progress and (it % 25 == 0 or it == cfg.iterations - 1):
            progress("optimize", it + 1, cfg.iterations, {"loss": loss_val, **stats})
    t_opt = time.perf_counter() - t1
    # Round the head to its stored precision, so the map in hand localizes exactly as the file will.
    head.load_scene_tensors({k: v.to(model.device) for k, v in head.scene_tensors().items()})
    windows = None
    if cfg.method == "aceg" and cache.grey_views is not None:
        windows = landmark_windows(cache.grey_views, cache.T_cam_map_I44, seed_images_M, head.positions.detach(),
                                   cfg.photo_depth.radius_px)

    views = None
    if keep_visits:  # the mapping poses as the cache holds them (relative to the map centre), not read again
        T_world_cam_I44 = np.linalg.inv(cache.T_cam_map_I44.double().cpu().numpy())
        T_world_cam_I44[:, :3, 3] += centre_3
        views = MappingViews.from_poses(T_world_cam_I44, cache.stamps_I.cpu().numpy(), seed_images_M.cpu().numpy(),
                                        cfg.visits.window_s)
    report = MappingReport(cfg.method, len(frames), n, cfg.iterations, loss_val, stats["median_px"],
                           stats["valid"], t_encode, t_seed, t_opt, cameras.lens_estimate, cameras.pose_check,
                           pose_refinement=refinement)
    meta = {
        "model_hash": model.model_hash(),
        "scene_frame": "map: the mapping poses' world frame; scene coords = centre + head output (m)",
        "camera_convention": "OpenCV optical frame (x right, y down, z forward), T_world_cam camera-to-world",
        "intrinsics": "pinhole, pixels, principal point at pixel-centre coordinates",
        "mapping": asdict(cfg),
        "report": asdict(report),
    }
    if refinement is not None:  # its poses are the map's business, not its metadata's
        meta["report"]["pose_refinement"] = refinement.to_json()
    scene_map = SceneMap(head.eval(), centre_3, meta, fine, windows, lens, views)
    if cfg.consistency.enabled and views is not None:
        report.consistency = _stage(progress, "consistency",
                                    lambda: map_consistency(model, scene_map, given, cfg.consistency, pnp),
                                    lambda c: {"probes": c.n_localized, "sigma_cm": c.sigma_cm})
        scene_map.floor_66 = report.consistency.covariance_66
        meta["report"]["consistency"] = report.consistency.to_json()
    return scene_map, report


def _stage(progress: Progress | None, name: str, run: Callable[[], T], stats: Callable[[T], dict]) -> T:
    """One step of ``map_scene`` with no progress of its own: reported as started (0 of 1), then
    done (1 of 1) with ``stats`` of its result."""
    if progress:
        progress(name, 0, 1, {})
    result = run()
    if progress:
        progress(name, 1, 1, stats(result))
    return result


def progress_bar(iterations: int, desc: str) -> tuple[Progress, "object"]:
    """A tqdm bar for ``map_scene``: ``(progress callback, bar)``; close the bar after. It counts the
    optimization's iterations, and names the stage running before and after them (the lens, pose
    check and refinement, encoding, seeding, consistency: minutes of a kitchen's mapping)."""
    from tqdm import tqdm

    bar = tqdm(total=iterations, desc=desc, unit="it")

    def progress(stage: str, done: int, total: int, stats: dict) -> None:
        if stage == "optimize":
            bar.set_description(desc, refresh=False)
            bar.n = done
            bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.3f}",
                            px=f"{stats.get('median_px', float('nan')):.1f}")
        else:
            bar.set_description(f"{desc} [{stage}{'' if total == 1 else f' {done}/{total}'}]", refresh=False)
        bar.refresh()

    return progress, bar
