"""Localization: one image in, a camera pose with covariance out (or a clear refusal).

remove the mapping camera's lens distortion, if mapping found one (``aceg_model.lens``) ->
encode -> regress scene coordinates + uncertainty for every patch ->
refine each patch's pixel to where its landmark lies (``aceg_model.pixel_refinement``) ->
prefilter by uncertainty -> robust PnP (poselib RANSAC + refinement) ->
solve again on the landmarks of the mapping visit nearest that pose (``aceg_model.visits``) ->
place the inliers' landmarks by their raw pixels and solve again
(``aceg_model.photometric_refinement``) -> optionally (``pnp.seed_ray_depth_sigma``, off by default)
fit the pose once more with each landmark's depth along its seed ray left uncertain
(``aceg_model.seed_rays``) -> 6x6 covariance from the inliers -> the first solve's pose instead,
where the re-solved one explains less than ``pnp.resolve_min_support`` of the first solve's
inliers (it found another pose, not a sharper one) -> for the mapping camera's
images, the pose of the frame its mapping poses described (``aceg_model.camera_mount``) ->
the map's covariance floor added (how its visits disagree, ``aceg_model.map_consistency``).
The network and the scene head stay on one device for the whole run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from aceg_model.encoder import patch_centres
from aceg_model.frames import Intrinsics
from aceg_model.geometry import invert
from aceg_model.lens import ImageUndistorter
from aceg_model.mapping import SceneMap
from aceg_model.model import AcegModel, prepare_image, to_original_pixels
from aceg_model.photo_depth import grey_image
from aceg_model.photometric_refinement import refine_observations
from aceg_model.pixel_refinement import encode_fine, refine_pixels
from aceg_model.pnp import (DegenerateGeometryError, PnPConfig, PnPResult, pose_covariance, refine_with_candidates,
                             solve_pnp, within_threshold)
from aceg_model.seed_rays import refine_along_seed_rays
from aceg_model.visits import solve_in_visit


@dataclass
class LocalizationResult:
    success: bool
    reason: str  # why no pose, or "ok"
    # Camera-to-map, 4x4 metres; for the mapping camera's images (same intrinsics), of the frame
    # its mapping poses described (the same unless mapping found the camera mounted off it).
    T_world_cam: np.ndarray | None
    covariance_66: np.ndarray | None  # ROS order (x, y, z, rot x, rot y, rot z), m^2 / rad^2, map frame
    # Of the last solve: the patch correspondences, or, after the photometric refinement, the
    # inliers' landmarks placed by their grey windows.
    n_inliers: int
    n_correspondences: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Share of the accepting solve's inliers that the returned pose explains (1 when no re-solve
    # changed the pose; NaN without a pose); see ``PnPConfig.resolve_min_support``.
    resolve_support: float = float("nan")
    # The accepting solve's pose was returned because the re-solved one explained too little of it.
    first_solve_kept: bool = False


@dataclass
class _Observations:
    """What a solve was given: per correspondence the landmark (map index), its 3D point (map
    frame) and where the query sees it (original image pixels)."""
    landmark_N: np.ndarray
    points_N3: np.ndarray
    pixels_N2: np.ndarray

    def subset(self, keep_N: np.ndarray) -> _Observations:
        return _Observations(self.landmark_N[keep_N], self.points_N3[keep_N], self.pixels_N2[keep_N])


class Localizer:
    """Holds a model and a scene map on one device and localizes images against them."""

    def __init__(self, model: AcegModel, scene_map: SceneMap, pnp: PnPConfig | None = None) -> None:
        self.model = model.eval()
        self.scene_map = scene_map
        self.pnp = pnp or PnPConfig()
        self._undistort = ImageUndistorter()  # the map's lens correction, remap tables built once

    @property
    def device(self) -> torch.device:
        return self.model.device

    def regress(self, image: np.ndarray, intrinsics: Intrinsics) -> tuple[np.ndarray, np.ndarray, np.ndarray, Intrinsics, dict]:
        """Scene coordinates (N x 3, map frame), log sigma (N), pixels (N x 2, original image;
        refined within their patches when ``pnp.refine_pixels`` and the map has fine keys) and timings."""
        image, t_lens = self._undistorted(image, intrinsics)
        coords, log_sigma, pixels, K_work, timings, _, _ = self._regress(image, intrinsics, with_candidates=False)
        timings.update(t_lens)
        return coords, log_sigma, pixels, K_work, timings

    @property
    def refines_photometrically(self) -> bool:
        """Whether accepted poses are refined on the landmarks' raw pixels (setting on, map with windows)."""
        return self.pnp.photometric_refinement and self.scene_map.windows is not None

    @property
    def refines_pixels(self) -> bool:
        """Whether localization refines the correspondences' pixels (setting on, map with fine keys)."""
        return self.pnp.refine_pixels and self.scene_map.fine is not None

    def pnp_config(self) -> PnPConfig:
        """The PnP settings for this localizer's correspondences: with refined pixels the inlier
        threshold is ``refined_threshold_px`` instead of ``threshold_px``."""
        if self.refines_pixels:
            return replace(self.pnp, threshold_px=self.pnp.refined_threshold_px)
        return self.pnp

    @torch.inference_mode()
    def _regress(self, image: np.ndarray, intrinsics: Intrinsics, with_candidates: bool,
                 allowed_M: torch.Tensor | None = None):
        """``regress`` plus each patch's candidate landmark positions (N x k x 3, map frame; None
        unless ``with_candidates`` and the map has landmarks), for the guided refinement, and
        each patch's best landmark (N; None for a map without landmarks). With ``allowed_M``
        (bool per landmark) the patches attend to those landmarks only."""
        t0 = time.perf_counter()
        image_1HW, K_work = prepare_image(image, intrinsics, self.model.config.image_height)
        feats_1Dhw = self.model.encoder(image_1HW.unsqueeze(0).to(self.device))
        self._sync()
        t1 = time.perf_counter()
        _, D, h, w = feats_1Dhw.shape
        feats_PD = feats_1Dhw[0].flatten(1).T
        refine = self.refines_pixels
        if with_candidates or refine or self.refines_photometrically or allowed_M is not None:
            coords_P3, log_sigma_P, candidates_Pk = self.scene_map.predict_with_candidates(feats_PD, allowed_M)
        else:
            (coords_P3, log_sigma_P), candidates_Pk = self.scene_map.predict(feats_PD), None
        self._sync()
        t2 = time.perf_counter()
        timings = {"encoder": 1e3 * (t1 - t0), "regressor": 1e3 * (t2 - t1)}
        pix_P2 = patch_centres(h, w, self.device)
        if refine and candidates_Pk is not None:
            fine = self.scene_map.fine
            desc_QK, fine_hw, _ = encode_fine(self.model, image, intrinsics, fine.scale, self.pnp.refine_bf16)
            pix_P2, _ = refine_pixels(fine.keys_MK[candidates_Pk[:, 0]], desc_QK, fine_hw, fine.scale, pix_P2,
                                      self.pnp.refine_window_px)
            self._sync()
            timings["refine_pixels"] = 1e3 * (time.perf_counter() - t2)
        pix_P2 = to_original_pixels(pix_P2.cpu().numpy(), K_work, intrinsics)
        candidates = None
        if with_candidates and candidates_Pk is not None:
            candidates = self.scene_map.landmark_positions(candidates_Pk).float().cpu().numpy().astype(np.float64)
        best = None if candidates_Pk is None else candidates_Pk[:, 0].cpu().numpy()
        return (coords_P3.float().cpu().numpy().astype(np.float64), log_sigma_P.float().cpu().numpy(),
                pix_P2, K_work, timings, candidates, best)

    def _undistorted(self, image: np.ndarray, intrinsics: Intrinsics) -> tuple[np.ndarray, dict[str, float]]:
        """The image without the mapping camera's lens distortion (``SceneMap.lens``), and its timing.
        Images of other cameras (other intrinsics) are returned as they are, with no timing."""
        lens = self.scene_map.lens
        if lens is None or lens.distortion.is_zero or not lens.applies_to(intrinsics):
            return image, {}
        t0 = time.perf_counter()
        image = self._undistort(image, intrinsics, lens.distortion.coefficients)
        return image, {"undistort": 1e3 * (time.perf_counter() - t0)}

    def localize(self, image: np.ndarray, intrinsics: Intrinsics,
                 allowed_landmarks: np.ndarray | None = None) -> LocalizationResult:
        """The image's pose in the map. ``allowed_landmarks`` (bool, one per landmark): match
        those landmarks only (mapping's consistency check leaves out the image's own visit)."""
        allowed_M = None
        if allowed_landmarks is not None:
            allowed_M = torch.as_tensor(np.asarray(allowed_landmarks, dtype=bool), device=self.device)
        image, t_lens = self._undistorted(image, intrinsics)
        coords, log_sigma, pixels, _, timings, candidates, best = self._regress(
            image, intrinsics, with_candidates=self.pnp.guided_refinement, allowed_M=allowed_M)
        timings.update(t_lens)
        pnp = self.pnp_config()
        res = solve_pnp(coords, pixels, intrinsics, pnp, uncertainty_N=np.exp(log_sigma))
        accepted = res  # its inliers are the evidence the pose was accepted on
        if candidates is not None:
            res = refine_with_candidates(res, candidates, pixels, intrinsics, pnp)
        timings.update({f"pnp_{k}" if not k.startswith("pnp") else k: v for k, v in res.timings_ms.items()})
        observed = _Observations(best, coords, pixels)
        if res.success and best is not None and self.solves_in_visit:
            t0 = time.perf_counter()
            res, keep = solve_in_visit(res, self.scene_map.views, best, coords, pixels, np.exp(log_sigma),
                                       intrinsics, pnp)
            observed = observed.subset(keep)
            timings["visit"] = 1e3 * (time.perf_counter() - t0)
        if res.success and best is not None and self.refines_photometrically:
            t0 = time.perf_counter()
            res, observed = self._refine_photometrically(res, observed, image, intrinsics)
            timings["photometric"] = 1e3 * (time.perf_counter() - t0)
        if res.success and best is not None and self.refines_along_seed_rays:
            t0 = time.perf_counter()
            res = self._refine_along_seed_rays(res, observed, intrinsics)
            timings["seed_rays"] = 1e3 * (time.perf_counter() - t0)
        support, first_kept = float("nan"), False
        if res.success:
            res, support, first_kept = self._supported(res, accepted, coords, pixels, intrinsics)
        timings["total"] = sum(v for k, v in timings.items())
        T_world_cam, covariance_66 = (res.T_world_cam, res.covariance_66) if res.success else (None, None)
        lens = self.scene_map.lens
        if res.success and lens is not None and lens.applies_to(intrinsics):
            # The mapping camera's queries are answered in the frame its mapping poses described.
            T_world_cam, covariance_66 = lens.mount.to_pose_frame(T_world_cam, covariance_66)
        if res.success and self.adds_map_floor:
            # Measured in mapping against the poses as given, so it is added in their frame.
            covariance_66 = covariance_66 + self.scene_map.floor_66
        return LocalizationResult(res.success, res.reason, T_world_cam, covariance_66, int(res.n_inliers),
                                  int(res.n_input), timings, support, first_kept)

    def _supported(self, res: PnPResult, accepted: PnPResult, coords_N3: np.ndarray, pixels_N2: np.ndarray,
                   intrinsics: Intrinsics) -> tuple[PnPResult, float, bool]:
        """The re-solved pose ``res``, or the accepting solve's where ``res`` explains less than
        ``resolve_min_support`` of its inliers; with the share ``res`` explains, and whether the
        accepting solve's pose was kept."""
        if res is accepted:
            return res, 1.0, False
        inlier_N = accepted.inlier_mask
        explained = within_threshold(res.T_world_cam, coords_N3[inlier_N], pixels_N2[inlier_N], intrinsics,
                                     self.pnp_config().threshold_for(intrinsics.height))
        support = float(explained.mean())
        keep_first = support < self.pnp.resolve_min_support
        return (accepted if keep_first else res), support, keep_first

    @property
    def adds_map_floor(self) -> bool:
        """Whether poses' covariances include the map's floor (setting on, map with a floor)."""
        return self.pnp.map_floor and self.scene_map.floor_66 is not None

    @property
    def solves_in_visit(self) -> bool:
        """Whether accepted poses are solved again within one mapping visit (setting on, map with views)."""
        return self.pnp.solve_in_visit and self.scene_map.views is not None

    @property
    def refines_along_seed_rays(self) -> bool:
        """Whether the final fit lets landmarks slide along their seed rays (setting on, map with views)."""
        return self.pnp.seed_ray_depth_sigma > 0 and self.scene_map.views is not None

    @torch.inference_mode()
    def _refine_photometrically(self, res: PnPResult, observed: _Observations, image: np.ndarray,
                                intrinsics: Intrinsics) -> tuple[PnPResult, _Observations]:
        """The pose solved again on the raw-pixel observations of its inliers' landmarks
        (``aceg_model.photometric_refinement``), with what it was solved on; ``res`` and
        ``observed`` themselves where that finds too little."""
        windows, pnp = self.scene_map.windows, self.pnp_config()
        ids_N = np.unique(observed.landmark_N[res.inlier_mask])
        ids = torch.as_tensor(ids_N, device=self.device)
        positions = self.scene_map.landmark_positions(ids).float()
        positions_N3 = positions.cpu().numpy().astype(np.float64)
        grey, K = grey_image(image, intrinsics, self.model.config.image_height, windows.scale)
        grey, K_33 = grey.to(self.device), torch.as_tensor(K.K, dtype=torch.float32, device=self.device)
        out = res
        for i in range(pnp.photometric_iterations):
            T_cam_world = torch.as_tensor(invert(out.T_world_cam), dtype=torch.float32, device=self.device)
            search = pnp.photometric_search_px if i == 0 else min(2, pnp.photometric_search_px)
            pix, ok = refine_observations(windows, ids, positions, grey, K_33, T_cam_world, search,
                                          pnp.photometric_min_ncc)
            ok = ok.cpu().numpy()
            if ok.sum() < pnp.min_inliers:
                break
            pixels_N2 = to_original_pixels(pix.cpu().numpy()[ok], K, intrinsics)
            again = solve_pnp(positions_N3[ok], pixels_N2, intrinsics, pnp)
            if not again.success:
                break
            out, observed = again, _Observations(ids_N[ok], positions_N3[ok], pixels_N2)
        return out, observed

    def _refine_along_seed_rays(self, res: PnPResult, observed: _Observations,
                                intrinsics: Intrinsics) -> PnPResult:
        """The accepted pose refitted to its inliers with each landmark's depth along its seed ray
        uncertain (``aceg_model.seed_rays``), with the covariance of that fit; ``res`` where the
        inliers leave the fit degenerate."""
        pnp, inlier_N = self.pnp_config(), res.inlier_mask
        views = self.scene_map.views
        seed_centres_N3 = views.centres_I3[views.seed_view_M[observed.landmark_N[inlier_N]]]
        points_N3, pixels_N2 = observed.points_N3[inlier_N], observed.pixels_N2[inlier_N]
        threshold_px = pnp.threshold_for(intrinsics.height)  # the sigma scales with the image as the threshold does
        T, whiten_N22 = refine_along_seed_rays(res.T_world_cam, points_N3, seed_centres_N3, pixels_N2, intrinsics,
                                               pnp.seed_ray_depth_sigma,
                                               pnp.seed_ray_sigma_px * threshold_px / pnp.threshold_px,
                                               0.5 * threshold_px)
        try:
            cov_66, sigma_px = pose_covariance(T, points_N3, pixels_N2, intrinsics, pnp.sigma_floor_px, whiten_N22)
        except DegenerateGeometryError:
            return res
        return replace(res, T_world_cam=T, covariance_66=cov_66, sigma_px=sigma_px)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
