"""Pre-training the encoder and the scene-agnostic regressor on generated scenes.

ACE-G's recipe (DESIGN.md §1), sized for whatever hardware runs it:
- many scenes in parallel, each with its own map codes; scenes retire after a
  number of uses and fresh ones (fresh random codes) take their place, so the
  regressor keeps learning to work with codes at every stage of optimization;
- *mapping iterations* on mapping views: codes + regressor + encoder;
- *query iterations* on query views (other lighting, other viewpoints):
  regressor + encoder only, codes fixed;
- losses: 3D NLL on rendered scene coordinates, the reprojection NLL used at
  mapping time, and a dense InfoNCE correspondence loss between a mapping
  and a query view (FINDINGS.md: that is what got a CPU encoder going).

Runs as one process or under ``torchrun`` (DDP: gloo on CPU, NCCL on GPU);
each rank owns its scenes and their codes, the network is shared.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from aceg_model.encoder import STRIDE, patch_centres
from aceg_model.epipolar_pairs import EpipolarPairs, PosedImage, epipolar_lines, fundamental, lines_in_crop
from aceg_model.frames import Intrinsics
from aceg_model.losses import (ReprojectionLossConfig, cell_line_distances, coords_nll, epipolar_nce, info_nce,
                               local_nce, reprojection_nll)
from aceg_model.model import AcegModel, ModelConfig, prepare_image
from aceg_model.photo_pairs import PhotoPairs, vga_photo_pairs
from aceg_model.pretrain_data import SceneViews, T_cam_map, View, load_views, patch_coords, zoomed_and_rolled
from aceg_model.safe_files import read_meta
from aceg_model.scene import correspondences, scene_coords

CHECKPOINT_KIND = "aceg-pretrain-state"
FINE_PARTS = ("both", "nce", "local")  # PretrainConfig.fine_parts


@dataclass
class PretrainConfig:
    steps: int = 2000  # one step = one mapping iteration + one query iteration
    scenes_in_pool: int = 12  # per rank: scenes whose codes are being optimized
    scenes_per_step: int = 4
    views_per_scene: int = 2
    patches_per_view: int = 512
    scene_uses: int = 150  # a scene retires after this many steps and a fresh one replaces it
    lr: float = 3e-4
    code_lr: float = 0.02
    weight_decay: float = 0.01
    w_coords: float = 1.0
    w_reproj: float = 0.05  # reprojection NLL is in px units; it dominates otherwise
    w_nce: float = 0.5
    nce_points: int = 256
    # Weight of local_nce beside the InfoNCE: each match against the features local_offsets
    # directions around it, local_min_px..local_max_px away (working pixels). 0: off.
    w_local: float = 0.0
    local_offsets: int = 8
    local_min_px: float = 3.0
    local_max_px: float = 12.0
    # Weight of the fine-scale term (fine_crop_loss): in fine_pairs pairs per iteration, matches
    # within a crop of both views encoded at fine_scale x the working height, where the pixel
    # refinement compares fine keys, each against the crop's other matches (InfoNCE with near
    # negatives) and against the features fine_min_px..fine_max_px (working pixels) beside it. 0: off.
    w_fine: float = 0.0
    fine_scale: int = 3
    fine_pairs: int = 2
    fine_crop_px: int = 64  # crop side in working pixels (both views)
    fine_points: int = 64
    fine_min_px: float = 1.5
    fine_max_px: float = 6.0
    # Which halves of the fine term count: "both" (stage 1f), "nce" (the crop's InfoNCE alone) or
    # "local" (the features beside each match alone). Either half alone draws what both draw.
    fine_parts: str = "both"
    # A fine pair is, with this probability, two views of a real photo on a plane rendered at
    # fine_photo_height (photo_pairs.vga_photo_pairs: the photo seen at 0.7-1.2x its own pixels)
    # instead of the rendered pair. The rendered views are 240 px, so their fine encoding (3x) is
    # of a thrice-magnified image; a 640x480 camera's query is magnified 1.5x. 0: off (stage 1f).
    fine_photo_prob: float = 0.0
    fine_photo_height: int = 480
    # Photo pairs of the same kind beside the rendered fine pairs rather than in their place: per
    # iteration this many, in a term of their own at w_fine (logged "fine_photo"), so the rendered
    # pairs' term is what stage 1f trains. 0: off.
    fine_photo_extra: int = 0
    # The second view of a pair is, with this probability, zoomed by a factor in
    # [1/zoom_max, zoom_max] and rolled by up to roll_max_deg (pretrain_data.zoomed_and_rolled):
    # scale and in-plane rotation beyond those of the rendered camera paths. 0: off.
    warp_prob: float = 0.0
    zoom_max: float = 1.5
    roll_max_deg: float = 20.0
    # A pair is, with this probability, drawn among the scene's pairs whose views see the same
    # surfaces from wide_min_deg..wide_max_deg apart (pretrain_data.pair_angles): out-of-plane
    # viewpoint changes, which random pairs of a camera path seldom give. 0: off.
    wide_pair_prob: float = 0.0
    wide_min_deg: float = 20.0
    wide_max_deg: float = 60.0
    # A pair is, with this probability, two views of a real photo laid on a plane
    # (photo_pairs.PhotoPairs): real image statistics under perspective changes, with exact
    # correspondences. Encoder-only runs (the pair has no place in a scene's codes). 0: off.
    photo_pair_prob: float = 0.0
    # Weight of the epipolar term (epipolar_pair_loss): per iteration, one pair of real photos
    # from known poses (epipolar_pairs.EpipolarPairs, never a tuning sequence), epi_points points
    # of each image against the other's cells, those within epi_band_px (working pixels) of the
    # point's epipolar line the positives. Real parallax, no depth needed. 0: off.
    w_epi: float = 0.0
    epi_points: int = 128
    epi_band_px: float = 6.0
    epi_max_gap: int = 2  # pairs are images 1..epi_max_gap apart in their sequence
    # Weight of the epipolar term at the fine scale (fine_epipolar_loss): the same pair's photos at
    # fine_scale x the working height, in a crop of fine_crop_px working pixels of each, fine_points
    # points of each crop against the other's cells, those within epi_fine_band_px (working pixels)
    # of the point's line the positives; it needs w_epi > 0, whose features place b's crop. 0: off.
    w_epi_fine: float = 0.0
    epi_fine_band_px: float = 1.5
    render_height: int = 240  # px; views are rendered at the model's working resolution
    mapping_frames: int = 32  # rendered per scene when it enters the pool
    query_frames: int = 12  # per query condition (lighting, viewpoint)
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200
    bank: str | None = None  # folder of pre-rendered scenes (pretrain_data.render_bank); None: render inline
    # A model file whose weights (and configuration) start the run instead of a fresh
    # initialization: continued pre-training of a shipped encoder. A resume state wins over it.
    init: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if min(self.w_coords, self.w_reproj, self.w_nce) < 0 or self.w_coords + self.w_reproj + self.w_nce == 0:
            raise ValueError("loss weights must be >= 0 and not all 0")
        if not 0 <= self.warp_prob <= 1 or self.zoom_max < 1 or not 0 <= self.roll_max_deg <= 90:
            raise ValueError("warp_prob must be in [0, 1], zoom_max >= 1 and roll_max_deg in [0, 90]")
        if not 1 <= self.scenes_per_step <= self.scenes_in_pool:
            raise ValueError("scenes_per_step must be in [1, scenes_in_pool]")
        if self.views_per_scene < 2:
            raise ValueError("views_per_scene must be >= 2: the correspondence loss works on view pairs")
        if not 0 <= self.wide_pair_prob <= 1 or not 0 <= self.wide_min_deg < self.wide_max_deg <= 180:
            raise ValueError("wide_pair_prob must be in [0, 1] and 0 <= wide_min_deg < wide_max_deg <= 180")
        if self.w_local < 0 or self.local_offsets < 1 or not 0 < self.local_min_px <= self.local_max_px:
            raise ValueError("w_local must be >= 0, local_offsets >= 1 and 0 < local_min_px <= local_max_px")
        if self.w_fine < 0 or self.fine_scale < 1 or self.fine_pairs < 1 or self.fine_points < 16 \
                or not 0 < self.fine_min_px <= self.fine_max_px or self.fine_crop_px < 4 * self.fine_max_px:
            raise ValueError("w_fine must be >= 0, fine_scale and fine_pairs >= 1, fine_points >= 16, "
                             "0 < fine_min_px <= fine_max_px and fine_crop_px >= 4 * fine_max_px")
        if not 0 <= self.fine_photo_prob <= 1 or self.fine_photo_height < self.fine_crop_px:
            raise ValueError("fine_photo_prob must be in [0, 1] and fine_photo_height >= fine_crop_px")
        if self.fine_photo_extra < 0 or (self.fine_photo_extra > 0 and self.w_fine == 0):
            raise ValueError("fine_photo_extra must be >= 0 (and > 0 only with w_fine > 0)")
        if self.fine_parts not in FINE_PARTS:
            raise ValueError(f"fine_parts must be one of {', '.join(FINE_PARTS)}, not {self.fine_parts!r}")
        if not 0 <= self.photo_pair_prob <= 1:
            raise ValueError("photo_pair_prob must be in [0, 1]")
        if self.w_epi < 0 or self.epi_points < 16 or self.epi_band_px <= 0 or self.epi_max_gap < 1:
            raise ValueError("w_epi must be >= 0, epi_points >= 16, epi_band_px > 0 and epi_max_gap >= 1")
        if self.w_epi_fine < 0 or self.epi_fine_band_px <= 0 or (self.w_epi_fine > 0 and self.w_epi == 0):
            raise ValueError("w_epi_fine must be >= 0 (and > 0 only with w_epi > 0) and epi_fine_band_px > 0")
        if self.photo_pair_prob > 0 and self.regresses:
            raise ValueError("photo pairs train the encoder alone: set w_coords and w_reproj to 0 with photo_pair_prob")

    @property
    def regresses(self) -> bool:
        """Whether the run trains through the regressor (3D and reprojection losses) or the
        encoder alone by the correspondence loss."""
        return self.w_coords > 0 or self.w_reproj > 0


class ScenePool:
    """Per-rank scenes with their codes; scene seeds are unique across ranks."""

    def __init__(self, cfg: PretrainConfig, regressor, rank: int, world: int, device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.regressor = regressor
        self.next_index = 0  # scenes rendered inline so far
        self.taken: set[Path] = set()  # bank files this rank has used
        self.scenes: list[SceneViews] = []
        self.codes: list[torch.nn.Parameter] = []
        self.uses: list[int] = []
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
        for _ in range(cfg.scenes_in_pool):
            self._add()

    def _next_scene(self, wait: bool) -> SceneViews | None:
        """The next unused scene: from the bank (this rank's share of its files) or rendered now."""
        if self.cfg.bank is None:
            seed = self.cfg.seed * 1_000_000 + self.next_index * self.world + self.rank
            self.next_index += 1
            return SceneViews.generate(seed, self.cfg.render_height, self.cfg.mapping_frames, self.cfg.query_frames)
        while True:
            # A rank's share is by seed, not by position: renderers working on several seed
            # ranges at once add files anywhere in the sorted list. "[0-9].npz" leaves out
            # the ".tmp.npz" of a scene still being written.
            files = [f for f in sorted(Path(self.cfg.bank).glob("scene-*[0-9].npz"))
                     if f not in self.taken and int(f.stem.split("-")[1]) % self.world == self.rank]
            if files:
                self.taken.add(files[0])
                return load_views(files[0])
            if not wait:
                return None
            time.sleep(2.0)  # the bank is still being rendered

    def _add(self, slot: int | None = None) -> bool:
        scene = self._next_scene(wait=slot is None)
        if scene is None:
            self.uses[slot] = 0  # no fresh scene yet: keep this one (and its codes) longer
            return False
        codes = torch.nn.Parameter(self.regressor.init_codes(1, self.gen)[0].to(self.device))
        if slot is None:
            self.scenes.append(scene), self.codes.append(codes), self.uses.append(0)
        else:
            self.scenes[slot], self.codes[slot], self.uses[slot] = scene, codes, 0
        return True

    def retire_used(self) -> list[int]:
        """Replace scenes used ``scene_uses`` times; returns the replaced slots."""
        return [i for i, u in enumerate(self.uses) if u >= self.cfg.scene_uses and self._add(i)]


def sample_patches(view: View, image_size: tuple[int, int], n: int, rng: np.random.Generator):
    """Patch indices with valid scene coordinates at their centres, their GT coords and pixels."""
    coords_P3, pix_P2 = patch_coords(view, image_size[0] // 8, image_size[1] // 8)
    ok = torch.isfinite(coords_P3).all(dim=1).nonzero()[:, 0].numpy()
    pick = rng.choice(ok, size=min(n, len(ok)), replace=False) if len(ok) else ok
    pick = torch.from_numpy(np.sort(pick))
    return pick, coords_P3[pick], pix_P2[pick]


def warped(view: View, cfg: PretrainConfig, rng: np.random.Generator) -> View:
    """``view`` zoomed and rolled at random with probability ``cfg.warp_prob``."""
    if cfg.warp_prob <= 0 or rng.random() >= cfg.warp_prob:
        return view
    scale = float(np.exp(rng.uniform(-np.log(cfg.zoom_max), np.log(cfg.zoom_max))))
    return zoomed_and_rolled(view, scale, float(rng.uniform(-cfg.roll_max_deg, cfg.roll_max_deg)))


def encode_views(model, views: list[View], cfg: PretrainConfig):
    """Encoder features of ``views`` at the working resolution and the prepared images."""
    device = next(model.parameters()).device
    prepared = [prepare_image(v.image, v.intrinsics, cfg.model.image_height) for v in views]
    return model.encoder(torch.stack([p[0] for p in prepared]).to(device)), prepared


def step_losses(model, views: list[View], codes_S: list[torch.Tensor], centres: list[np.ndarray],
                cfg: PretrainConfig, rng: np.random.Generator, progress: float, loss_cfg: ReprojectionLossConfig):
    """Loss of one iteration over S scenes x V views each; codes may be detached (query iterations)."""
    device = next(model.parameters()).device
    V = cfg.views_per_scene
    feats_BDhw, prepared = encode_views(model, views, cfg)
    images_hw = prepared[0][0].shape[-2:]
    B, D, h, w = feats_BDhw.shape
    feats_BPD = feats_BDhw.flatten(2).transpose(1, 2)
    picks = [sample_patches(v, images_hw, cfg.patches_per_view, rng) for v in views]
    b = min(len(p[0]) for p in picks)
    if b < 16:
        return None
    sel = [p[0][:b] for p in picks]
    feats_SbD = torch.stack([
        torch.cat([feats_BPD[s * V + k, sel[s * V + k]] for k in range(V)]) for s in range(len(codes_S))
    ])
    coords_Sb3, log_sigma_Sb = model.regressor(feats_SbD, torch.stack(codes_S))
    gt_Sb3 = torch.stack([
        torch.cat([picks[s * V + k][1][:b] for k in range(V)]) - torch.as_tensor(centres[s], dtype=torch.float32)
        for s in range(len(codes_S))
    ]).to(device)
    l_coords = coords_nll(coords_Sb3.reshape(-1, 3), log_sigma_Sb.reshape(-1), gt_Sb3.reshape(-1, 3))
    # Reprojection NLL exactly as mapping uses it (coords relative to each scene's centre).
    T_list, K, pix = [], [], []
    for s in range(len(codes_S)):
        for k in range(V):
            T = T_cam_map(views[s * V + k], centres[s])
            T_list.append(torch.as_tensor(T, dtype=torch.float32).expand(b, 4, 4))
            K.append(torch.as_tensor(prepared[s * V + k][1].K, dtype=torch.float32).expand(b, 3, 3))
            pix.append(picks[s * V + k][2][:b])
    l_reproj, stats = reprojection_nll(coords_Sb3.reshape(-1, 3), log_sigma_Sb.reshape(-1), torch.cat(pix).to(device),
                                       torch.cat(T_list).to(device), torch.cat(K).to(device), progress, loss_cfg)
    err = (coords_Sb3 - gt_Sb3).norm(dim=-1)
    return l_coords, l_reproj, {"median_err_cm": 100 * err.median().item(), **stats}, feats_BDhw, prepared


def correspondence_loss(feats_BDhw, prepared, views: list[View], cfg: PretrainConfig, rng: np.random.Generator,
                        local_rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """InfoNCE between view pairs (0,1), (2,3), ... of the same scene, from rendered geometry, and with
    ``cfg.w_local`` the ``local_nce`` of each match against the features beside it, as means over
    the pairs; None without a pair of enough matches. The local offsets come from ``local_rng``, not
    ``rng``, so that a run with the local loss draws the same views and matches as one without."""
    from aceg_model.pretrain_data import view_correspondences

    nces, locals_ = [], []
    for a in range(0, len(views) - 1, 2):
        Ka, Kb = prepared[a][1], prepared[a + 1][1]
        uv_a, uv_b = view_correspondences(views[a], views[a + 1], Ka, Kb, cfg.nce_points, rng)
        if len(uv_a) < 16:
            continue
        fa = bilinear(feats_BDhw[a], uv_a, Ka)
        fb = bilinear(feats_BDhw[a + 1], uv_b, Kb)
        nces.append(info_nce(fa, fb))
        if cfg.w_local > 0:
            around = ring_around(uv_b, cfg.local_offsets, cfg.local_min_px, cfg.local_max_px, local_rng)
            beside = bilinear(feats_BDhw[a + 1], around.reshape(-1, 2), Kb).reshape(len(uv_b), cfg.local_offsets, -1)
            locals_.append(local_nce(fa, torch.cat([fb[:, None], beside], 1)))
    if not nces:
        return None
    return torch.stack(nces).mean(), torch.stack(locals_).mean() if locals_ else None


def ring_around(uv_N2: np.ndarray, k: int, min_px: float, max_px: float, rng: np.random.Generator) -> np.ndarray:
    """``N x k x 2`` points around each of ``uv``: k evenly turned directions (a random turn per
    point), each at a random radius in [min_px, max_px]; the local losses' negatives."""
    n = len(uv_N2)
    turn = rng.uniform(0, 2 * np.pi, (n, 1)) + np.arange(k) * 2 * np.pi / k
    radius = rng.uniform(min_px, max_px, (n, k))
    return uv_N2[:, None] + radius[..., None] * np.stack([np.cos(turn), np.sin(turn)], -1)


def fine_crop(image_1HW: torch.Tensor, centre_px: np.ndarray, side: int) -> tuple[torch.Tensor, np.ndarray]:
    """A ``side`` x ``side`` crop of a normalized fine image about ``centre_px``, its origin on the
    encoder's stride grid (so its features are the whole image's) and inside the image."""
    H, W = image_1HW.shape[-2:]
    origin = np.floor((np.asarray(centre_px) - side / 2) / STRIDE) * STRIDE
    origin = np.clip(origin, 0, [W - side, H - side]).astype(int)
    return image_1HW[:, origin[1]:origin[1] + side, origin[0]:origin[0] + side], origin


def fine_crop_loss(model, a: View, b: View, cfg: PretrainConfig, rng: np.random.Generator) -> torch.Tensor | None:
    """The fine-scale term of one view pair: both views encoded at ``cfg.fine_scale`` x the working
    height, as the pixel refinement encodes a query and mapping encodes its fine keys, in a crop of
    ``cfg.fine_crop_px`` working pixels about one match; the matches drawn inside A's crop whose
    neighbourhood lies inside B's, each against the crop's other matches (InfoNCE) and against
    B's features ``cfg.fine_min_px..cfg.fine_max_px`` beside it (local_nce), or one of the two by
    ``cfg.fine_parts``. None without ``cfg.fine_points // 4`` such matches. Views may be of any
    height (rendered ones are at the working height, photo pairs at ``cfg.fine_photo_height``)."""
    s, side = cfg.fine_scale, cfg.fine_crop_px * cfg.fine_scale
    height = cfg.model.image_height * s
    # Each view's pixels -> fine pixels (pixel-centre convention).
    sa, sb = height / a.intrinsics.height, height / b.intrinsics.height
    if side > min(height, round(a.intrinsics.width * sa), round(b.intrinsics.width * sb)):
        return None
    anchor_a, anchor_b = correspondences(a, b, 1, rng, candidates=256)
    if not len(anchor_a):
        return None
    device = next(model.parameters()).device
    images = [model.encoder.normalize(prepare_image(v.image, v.intrinsics, height)[0][None].to(device))[0]
              for v in (a, b)]
    crop_a, origin_a = fine_crop(images[0], (anchor_a[0] + 0.5) * sa - 0.5, side)
    crop_b, origin_b = fine_crop(images[1], (anchor_b[0] + 0.5) * sb - 0.5, side)
    # Draw matches only among A's pixels inside its crop (a margin of 2 working pixels).
    coords = scene_coords(a).copy()
    inside = np.zeros(coords.shape[:2], bool)
    margin = 2 * s / sa
    lo, hi = (origin_a + 0.5) / sa - 0.5 + margin, (origin_a + side + 0.5) / sa - 0.5 - margin
    inside[int(np.ceil(lo[1])):int(np.floor(hi[1])) + 1, int(np.ceil(lo[0])):int(np.floor(hi[0])) + 1] = True
    coords[~inside] = np.nan
    uv_a, uv_b = correspondences(replace(a, meta={**a.meta, "scene_coords": coords}), b, 2 * cfg.fine_points, rng)
    # Fine pixels in crop coordinates; B's offsets must stay inside B's crop.
    fa_px = (uv_a + 0.5) * sa - 0.5 - origin_a
    fb_px = (uv_b + 0.5) * sb - 0.5 - origin_b
    reach = (cfg.fine_max_px + 1) * s
    ok = ((fb_px >= reach) & (fb_px <= side - 1 - reach)).all(1)
    fa_px, fb_px = fa_px[ok][:cfg.fine_points], fb_px[ok][:cfg.fine_points]
    if len(fa_px) < cfg.fine_points // 4:
        return None
    feats = model.encoder.features(torch.stack([crop_a, crop_b]))
    fa = bilinear(feats[0], fa_px, None)
    fb = bilinear(feats[1], fb_px, None)
    # Drawn whichever halves count, so that either alone draws what both draw.
    around = ring_around(fb_px, cfg.local_offsets, s * cfg.fine_min_px, s * cfg.fine_max_px, rng)
    parts = []
    if cfg.fine_parts in ("both", "nce"):
        parts.append(info_nce(fa, fb))
    if cfg.fine_parts in ("both", "local"):
        beside = bilinear(feats[1], around.reshape(-1, 2), None).reshape(len(fb_px), cfg.local_offsets, -1)
        parts.append(local_nce(fa, torch.cat([fb[:, None], beside], 1)))
    return sum(parts)


def epipolar_pair_loss(model, a: PosedImage, b: PosedImage, cfg: PretrainConfig, changed: bool,
                       rng: np.random.Generator, fine_rng: np.random.Generator | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The epipolar term of one real posed pair, both ways: ``cfg.epi_points`` random pixels of
    each image against the other's cells (``losses.epipolar_nce``). With ``changed`` (query
    iterations) b's brightness curve is bent by a random gamma. With ``fine_rng``, the term at the
    fine scale too (``fine_epipolar_loss``), drawn from it alone. Each is None when no line crosses."""
    device = next(model.parameters()).device
    gamma = rng.uniform(0.5, 2.0) if changed else 1.0
    feats = model.encoder(torch.from_numpy(np.stack([a.image_hw, b.image_hw ** gamma]))[:, None].float().to(device))
    terms = []
    for (x, y, fx, fy) in ((a, b, feats[0], feats[1]), (b, a, feats[1], feats[0])):
        H, W = x.image_hw.shape
        uv = rng.uniform([4.0, 4.0], [W - 4.0, H - 4.0], (cfg.epi_points, 2))
        lines = torch.as_tensor(epipolar_lines(fundamental(x, y), uv), dtype=torch.float32, device=device)
        term = epipolar_nce(bilinear(fx, uv, None), fy, lines, cfg.epi_band_px)
        terms += [] if term is None else [term]
    fine = None if fine_rng is None else fine_epipolar_loss(model, a, b, feats.detach(), gamma, cfg, fine_rng)
    return torch.stack(terms).mean() if terms else None, fine


def fine_epipolar_loss(model, a: PosedImage, b: PosedImage, feats_2Dhw: torch.Tensor, gamma: float,
                       cfg: PretrainConfig, rng: np.random.Generator) -> torch.Tensor | None:
    """The epipolar term at the fine scale, where the pixel refinement compares fine keys: a crop of
    ``cfg.fine_crop_px`` working pixels of each photo at ``cfg.fine_scale`` x the working height
    (``PosedImage.fine``), a's about a random point and b's about that point's best match in b's
    coarse features (``feats_2Dhw``, b's under ``gamma``) near its line; ``cfg.fine_points`` points
    of the central half of each crop against the other crop's cells, those within
    ``cfg.epi_fine_band_px`` working pixels of the point's line the positives. Where a crop misses
    a point's match, the cells off its line are still true negatives. None when no line crosses."""
    if a.fine is None or b.fine is None:
        raise ValueError("the fine epipolar term needs the photos at the fine scale: EpipolarPairs(fine_scale=...)")
    s, device = cfg.fine_scale, feats_2Dhw.device
    side = cfg.fine_crop_px * s
    if side > min(*a.fine.image_hw.shape, *b.fine.image_hw.shape):
        return None
    H, W = a.image_hw.shape
    half = cfg.fine_crop_px / 2
    anchor = rng.uniform([half, half], [W - half, H - half])[None]
    line = torch.as_tensor(epipolar_lines(fundamental(a, b), anchor), dtype=torch.float32, device=device)
    _, h, w = feats_2Dhw[1].shape
    off_line = cell_line_distances(line, h, w)[0] > cfg.epi_band_px
    if off_line.all():
        return None
    similarity = F.normalize(bilinear(feats_2Dhw[0], anchor, None), dim=1) @ F.normalize(feats_2Dhw[1].flatten(1), dim=0)
    best = int(similarity[0].masked_fill(off_line, float("-inf")).argmax())
    match = patch_centres(h, w)[best].numpy()[None]

    def fine_px(uv: np.ndarray, x: PosedImage) -> np.ndarray:  # working pixels of x -> its fine pixels
        scale = np.array(x.fine.image_hw.shape[::-1]) / np.array(x.image_hw.shape[::-1])
        return (uv + 0.5) * scale - 0.5

    images = [model.encoder.normalize(torch.from_numpy(image)[None, None].float().to(device))[0]
              for image in (a.fine.image_hw, b.fine.image_hw ** gamma)]
    crop_a, origin_a = fine_crop(images[0], fine_px(anchor, a)[0], side)
    crop_b, origin_b = fine_crop(images[1], fine_px(match, b)[0], side)
    feats = model.encoder.features(torch.stack([crop_a, crop_b]))
    F_ab = fundamental(a.fine, b.fine)
    terms = []
    for F_xy, origin_x, origin_y, fx, fy in ((F_ab, origin_a, origin_b, feats[0], feats[1]),
                                             (F_ab.T, origin_b, origin_a, feats[1], feats[0])):
        uv = rng.uniform(side / 4, 3 * side / 4, (cfg.fine_points, 2))  # crop pixels
        lines = torch.as_tensor(lines_in_crop(F_xy, uv, origin_x, origin_y), dtype=torch.float32, device=device)
        term = epipolar_nce(bilinear(fx, uv, None), fy, lines, cfg.epi_fine_band_px * s)
        terms += [] if term is None else [term]
    return torch.stack(terms).mean() if terms else None


def bilinear(feats_Dhw: torch.Tensor, uv_N2: np.ndarray, K) -> torch.Tensor:
    """Features at working-resolution pixels ``uv`` (patch centre (8j+3.5) maps to cell j)."""
    D, h, w = feats_Dhw.shape
    uv = torch.as_tensor(uv_N2, dtype=torch.float32, device=feats_Dhw.device)
    gx = ((uv[:, 0] - 3.5) / 8 + 0.5) / w * 2 - 1
    gy = ((uv[:, 1] - 3.5) / 8 + 0.5) / h * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).view(1, 1, -1, 2)
    return F.grid_sample(feats_Dhw[None], grid, align_corners=False)[0, :, 0].T


def setup_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; initializes the process group under torchrun.

    With a GPU per rank the group is NCCL's. With more ranks than GPUs (the data preparation
    is Python on the CPU, so several ranks per GPU keep one busy) the ranks share the GPUs
    round-robin and the group is gloo's: NCCL refuses two ranks on one GPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        dist.init_process_group("nccl" if gpus and world <= gpus else "gloo")
        if gpus:
            local = int(os.environ.get("LOCAL_RANK", 0)) % gpus
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the shared network's gradients across ranks in one all-reduce.

    By hand rather than DDP: codes differ per rank, and a rank whose step had no loss still
    takes part (with zero gradients) so that no rank waits forever. Under gloo the buffer goes
    through host memory.
    """
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    host = dist.get_backend() == "gloo" and flat.is_cuda
    buf = flat.cpu() if host else flat
    dist.all_reduce(buf)
    flat = (buf.to(flat.device) if host else buf) / world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def synced_elapsed(t0: float, world: int) -> float:
    """Seconds since ``t0``, the largest over ranks: every rank takes the same learning rate and
    stops at the same step (a rank that stopped alone would leave the others in an all-reduce)."""
    elapsed = time.perf_counter() - t0
    if world == 1:
        return elapsed
    t = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def cosine_lr(peak: float, step: int, steps: int, elapsed_s: float, budget_s: float | None) -> float:
    """Cosine decay from ``peak`` over the steps or the time budget, whichever ends first, so that
    a run sized by time (a GPU's throughput is not known ahead) still decays to zero."""
    progress = max(step / steps, elapsed_s / budget_s if budget_s else 0.0)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(cfg: PretrainConfig, out_dir: Path, resume: bool = True, time_budget_s: float | None = None) -> Path:
    """Run pre-training; writes ``out_dir/model.safetensors`` (rank 0) and resumable state."""
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "pretrain_state.safetensors"
    resuming = resume and state_path.exists()
    # A run starts from its state file (resume), else from cfg.init, else fresh; a file brings
    # its own configuration with its weights.
    start_file = state_path if resuming else cfg.init
    if start_file:
        model = AcegModel.load(start_file, device).train()
        cfg = replace(cfg, model=model.config)
    else:
        model = AcegModel(cfg.model).to(device)
    start_step = int(read_meta(state_path, kind="aceg-model").get("step", 0)) if resuming else 0
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pool = ScenePool(cfg, model.regressor, rank, world, device)
    code_opts = [torch.optim.Adam([c], lr=cfg.code_lr) for c in pool.codes]
    rng = np.random.default_rng(cfg.seed * 7919 + rank)
    local_rng = np.random.default_rng([cfg.seed, rank, 1])  # the local loss's offsets only
    fine_rng = np.random.default_rng([cfg.seed, rank, 2])  # the fine term's crops and matches only
    epi_rng = np.random.default_rng([cfg.seed, rank, 3])  # the epipolar term's pairs and points only
    epi_fine_rng = np.random.default_rng([cfg.seed, rank, 4]) if cfg.w_epi_fine > 0 else None  # its fine crops
    loss_cfg = ReprojectionLossConfig()
    log_path = out_dir / "pretrain_log.jsonl"
    # The parameters every rank trains: an encoder-only run leaves the regressor without gradients.
    shared = list(model.parameters() if cfg.regresses else model.encoder.parameters())
    photos = PhotoPairs() if cfg.photo_pair_prob > 0 else None
    fine_photos = vga_photo_pairs() if cfg.w_fine > 0 and (cfg.fine_photo_prob > 0 or cfg.fine_photo_extra > 0) \
        else None
    real_pairs = EpipolarPairs(cfg.model.image_height, max_gap=cfg.epi_max_gap,
                               fine_scale=cfg.fine_scale if cfg.w_epi_fine > 0 else None) if cfg.w_epi > 0 else None
    t0 = time.perf_counter()
    step = start_step
    for step in range(start_step, cfg.steps):
        elapsed = synced_elapsed(t0, world)
        if time_budget_s and elapsed > time_budget_s:
            break
        lr = cosine_lr(cfg.lr, step, cfg.steps, elapsed, time_budget_s)
        for g in opt.param_groups:
            g["lr"] = lr
        slots = list(rng.choice(len(pool.scenes), size=cfg.scenes_per_step, replace=False))
        centres = [pool.scenes[i].centre_3 for i in slots]
        log: dict = {"step": step, "lr": lr}
        for phase in ("mapping", "query"):
            views = []
            for i in slots:
                scene = pool.scenes[i]
                if photos is not None and rng.random() < cfg.photo_pair_prob:
                    pair = photos.pair(scene.mapping[0].intrinsics, phase == "query", rng)
                else:
                    pair = scene.view_pair(phase == "query", rng, cfg.wide_pair_prob,
                                           (cfg.wide_min_deg, cfg.wide_max_deg))
                views += [*pair, *(scene.mapping_view(rng) if phase == "mapping" else scene.query_view(rng)
                                   for _ in range(cfg.views_per_scene - 2))]
            views = [warped(v, cfg, rng) if k % 2 else v for k, v in enumerate(views)]
            # Query iterations see codes as constants: only the network learns to generalize.
            codes = [pool.codes[i] if phase == "mapping" else pool.codes[i].detach() for i in slots]
            l_coords = l_reproj = l_nce = l_local = l_fine = l_fine_photo = l_epi = l_epi_fine = feats = prepared = None
            terms: list[torch.Tensor] = []
            stats: dict = {}
            if cfg.regresses:
                out = step_losses(model, views, codes, centres, cfg, rng, pool.uses[slots[0]] / cfg.scene_uses,
                                  loss_cfg)
                if out is not None:
                    l_coords, l_reproj, stats, feats, prepared = out
                    terms = [cfg.w_coords * l_coords, cfg.w_reproj * l_reproj]
            else:
                feats, prepared = encode_views(model, views, cfg)
            matched = correspondence_loss(feats, prepared, views, cfg, rng, local_rng) \
                if feats is not None and cfg.w_nce > 0 else None
            if matched is not None:
                l_nce, l_local = matched
                terms.append(cfg.w_nce * (l_nce if l_local is None else l_nce + cfg.w_local * l_local))
            if cfg.w_fine > 0:
                def photo_pair(K: Intrinsics) -> tuple[View, View]:  # a real photo seen by K at fine_photo_height
                    return fine_photos.pair(K.resized(round(K.width * cfg.fine_photo_height / K.height),
                                                      cfg.fine_photo_height), phase == "query", fine_rng)

                # The first fine_pairs pairs that overlap (about half of the drawn pairs do not).
                fine = []
                for j in range(len(views) // 2):
                    pair = views[2 * j], views[2 * j + 1]
                    if cfg.fine_photo_prob > 0 and fine_rng.random() < cfg.fine_photo_prob:
                        pair = photo_pair(pair[0].intrinsics)
                    f = fine_crop_loss(model, *pair, cfg, fine_rng)
                    fine += [] if f is None else [f]
                    if len(fine) == cfg.fine_pairs:
                        break
                if fine:
                    l_fine = torch.stack(fine).mean()
                    terms.append(cfg.w_fine * l_fine)
                # Drawn after the rendered pairs, so that those draw what they draw without these.
                extra = [f for f in (fine_crop_loss(model, *photo_pair(views[0].intrinsics), cfg, fine_rng)
                                     for _ in range(cfg.fine_photo_extra)) if f is not None]
                if extra:
                    l_fine_photo = torch.stack(extra).mean()
                    terms.append(cfg.w_fine * l_fine_photo)
            if real_pairs is not None:
                l_epi, l_epi_fine = epipolar_pair_loss(model, *real_pairs.pair(epi_rng), cfg, phase == "query",
                                                       epi_rng, epi_fine_rng)
                terms += [] if l_epi is None else [cfg.w_epi * l_epi]
                terms += [] if l_epi_fine is None else [cfg.w_epi_fine * l_epi_fine]
            if not terms and world == 1:  # too few valid patches or correspondences in this draw
                continue
            opt.zero_grad(set_to_none=True)
            for i in slots:
                code_opts[i].zero_grad(set_to_none=True)
            loss = sum(terms) if terms else None
            if loss is not None:
                loss.backward()
            if world > 1:
                # Every rank steps on the average, a rank without a loss this time too, so that
                # the shared weights stay the same on all of them.
                average_gradients(shared, world)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if loss is None:
                continue
            if phase == "mapping":
                for i in slots:
                    code_opts[i].step()
            named = (("coords", l_coords), ("reproj", l_reproj), ("nce", l_nce), ("local", l_local), ("fine", l_fine),
                     ("fine_photo", l_fine_photo), ("epi", l_epi), ("epi_fine", l_epi_fine))
            log[phase] = {"loss": loss.item(), **{k: None if v is None else v.item() for k, v in named}, **stats}
        for i in slots:
            pool.uses[i] += 1
        for i in pool.retire_used():
            code_opts[i] = torch.optim.Adam([pool.codes[i]], lr=cfg.code_lr)
        if rank == 0 and step % cfg.log_every == 0:
            log["elapsed_s"] = round(time.perf_counter() - t0, 1)
            with open(log_path, "a") as f:
                f.write(json.dumps(log) + "\n")
            m, q = log.get("mapping", {}), log.get("query", {})
            print(f"step {step:6d} | {log['elapsed_s']:7.1f} s | map: err {m.get('median_err_cm', float('nan')):6.1f} cm "
                  f"nce {m.get('nce') or float('nan'):.3f} | query: err {q.get('median_err_cm', float('nan')):6.1f} cm "
                  f"nce {q.get('nce') or float('nan'):.3f}", flush=True)
        if rank == 0 and (step + 1) % cfg.checkpoint_every == 0:
            save_state(state_path, model, step + 1, cfg)
    if rank == 0:
        save_state(state_path, model, step + 1, cfg)
        model.save(out_dir / "model.safetensors", {"pretrain": asdict(cfg), "steps_done": step + 1,
                                                    "seconds": round(time.perf_counter() - t0, 1),
                                                    "world_size": world, "device": str(device)})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out_dir / "model.safetensors"


def save_state(path: Path, model: AcegModel, step: int, cfg: PretrainConfig) -> None:
    model.save(path, {"step": step, "pretrain": asdict(cfg)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Pre-train the ACE-G encoder and regressor on generated scenes "
                                "(single process, or under torchrun for DDP).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (model.safetensors, state, log)")
    p.add_argument("--steps", type=int, default=PretrainConfig.steps, help="mapping+query iteration pairs")
    p.add_argument("--minutes", type=float, default=None, help="stop after this wall time (minutes), then save")
    p.add_argument("--scenes-in-pool", type=int, default=PretrainConfig.scenes_in_pool, help="scenes per rank")
    p.add_argument("--scenes-per-step", type=int, default=PretrainConfig.scenes_per_step,
                   help="scenes per rank in each iteration (two views each)")
    p.add_argument("--scene-uses", type=int, default=PretrainConfig.scene_uses, help="steps before a scene retires")
    p.add_argument("--mapping-frames", type=int, default=PretrainConfig.mapping_frames, help="rendered per scene")
    p.add_argument("--query-frames", type=int, default=PretrainConfig.query_frames, help="per query condition")
    p.add_argument("--bank", default=None, help="folder of pre-rendered scenes (python -m aceg_model.pretrain_data)")
    p.add_argument("--seed", type=int, default=0, help="seed of scenes and sampling")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if a state file exists")
    p.add_argument("--init", default=None, help="model file to continue from (its weights and configuration)")
    p.add_argument("--lr", type=float, default=PretrainConfig.lr, help="peak learning rate (cosine decay)")
    p.add_argument("--w-coords", type=float, default=PretrainConfig.w_coords, help="weight of the 3D loss")
    p.add_argument("--w-reproj", type=float, default=PretrainConfig.w_reproj,
                   help="weight of the reprojection NLL")
    p.add_argument("--w-nce", type=float, default=PretrainConfig.w_nce,
                   help="weight of the correspondence loss (0 with the other two: encoder alone)")
    p.add_argument("--warp-prob", type=float, default=PretrainConfig.warp_prob,
                   help="probability that a pair's second view is zoomed and rolled (0: off)")
    p.add_argument("--zoom-max", type=float, default=PretrainConfig.zoom_max,
                   help="zoom factors are drawn log-uniform in [1/zoom-max, zoom-max]")
    p.add_argument("--roll-max-deg", type=float, default=PretrainConfig.roll_max_deg,
                   help="rolls about the optical axis are drawn uniform in +-roll-max-deg")
    p.add_argument("--wide-pair-prob", type=float, default=PretrainConfig.wide_pair_prob,
                   help="probability that a view pair is drawn among those that see the same surfaces "
                   "from --wide-min-deg..--wide-max-deg apart (0: off)")
    p.add_argument("--wide-min-deg", type=float, default=PretrainConfig.wide_min_deg,
                   help="least angle at the surface between the views of a wide pair")
    p.add_argument("--wide-max-deg", type=float, default=PretrainConfig.wide_max_deg,
                   help="largest angle at the surface between the views of a wide pair")
    p.add_argument("--w-local", type=float, default=PretrainConfig.w_local,
                   help="weight of the local correspondence loss: each match against the features "
                   "--local-min-px..--local-max-px beside it (0: off)")
    p.add_argument("--w-fine", type=float, default=PretrainConfig.w_fine,
                   help="weight of the fine-scale term: matches in crops of both views encoded at "
                   "--fine-scale x the working height, against near matches and the features beside them (0: off)")
    p.add_argument("--fine-parts", choices=FINE_PARTS, default=PretrainConfig.fine_parts,
                   help="the fine term's halves: both, its InfoNCE among the crop's matches alone (nce), "
                   "or its loss against the features beside each match alone (local)")
    p.add_argument("--fine-photo-prob", type=float, default=PretrainConfig.fine_photo_prob,
                   help="probability that a fine pair is two views of a real photo on a plane rendered at "
                   "--fine-photo-height instead of the rendered pair (0: off)")
    p.add_argument("--fine-photo-extra", type=int, default=PretrainConfig.fine_photo_extra,
                   help="fine photo pairs per iteration beside the rendered fine pairs, in a term of their own "
                   "at --w-fine (0: off)")
    p.add_argument("--fine-photo-height", type=int, default=PretrainConfig.fine_photo_height,
                   help="height of the fine photo pairs' views (px; 480: a 640x480 camera)")
    p.add_argument("--fine-scale", type=int, default=PretrainConfig.fine_scale,
                   help="the fine term's encoding scale (the pixel refinement's: 3)")
    p.add_argument("--local-min-px", type=float, default=PretrainConfig.local_min_px,
                   help="least distance of the local loss's neighbours (working pixels)")
    p.add_argument("--local-max-px", type=float, default=PretrainConfig.local_max_px,
                   help="largest distance of the local loss's neighbours (working pixels)")
    p.add_argument("--w-epi", type=float, default=PretrainConfig.w_epi,
                   help="weight of the epipolar term: per iteration a pair of real posed photos (Strecha "
                   "fountain, entry, castle; KITTI 01), each point's matches asked to lie on its epipolar line (0: off)")
    p.add_argument("--epi-band-px", type=float, default=PretrainConfig.epi_band_px,
                   help="the epipolar term's band: cells whose centre is this close to the line (working pixels) are positives")
    p.add_argument("--w-epi-fine", type=float, default=PretrainConfig.w_epi_fine,
                   help="weight of the epipolar term at the fine scale: crops of the same pair encoded at "
                   "--fine-scale x the working height (needs --w-epi > 0; 0: off)")
    p.add_argument("--epi-fine-band-px", type=float, default=PretrainConfig.epi_fine_band_px,
                   help="the fine epipolar term's band (working pixels)")
    p.add_argument("--photo-pair-prob", type=float, default=PretrainConfig.photo_pair_prob,
                   help="probability that a view pair is two views of a real photo on a plane "
                   "(encoder-only runs: --w-coords 0 --w-reproj 0; 0: off)")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.lr <= 0:
        p.error("--steps and --lr must be > 0")
    if args.init and not Path(args.init).is_file():
        p.error(f"--init {args.init}: no such file")
    try:
        cfg = PretrainConfig(steps=args.steps, scenes_in_pool=args.scenes_in_pool,
                             scenes_per_step=args.scenes_per_step, scene_uses=args.scene_uses,
                             mapping_frames=args.mapping_frames, query_frames=args.query_frames, seed=args.seed,
                             bank=args.bank, init=args.init, lr=args.lr, w_coords=args.w_coords,
                             w_reproj=args.w_reproj, w_nce=args.w_nce, warp_prob=args.warp_prob,
                             zoom_max=args.zoom_max, roll_max_deg=args.roll_max_deg,
                             wide_pair_prob=args.wide_pair_prob, wide_min_deg=args.wide_min_deg,
                             wide_max_deg=args.wide_max_deg, photo_pair_prob=args.photo_pair_prob,
                             w_local=args.w_local, local_min_px=args.local_min_px, local_max_px=args.local_max_px,
                             w_fine=args.w_fine, fine_scale=args.fine_scale,
                             fine_parts=args.fine_parts, fine_photo_prob=args.fine_photo_prob,
                             fine_photo_height=args.fine_photo_height,
                             fine_photo_extra=args.fine_photo_extra, w_epi=args.w_epi,
                             epi_band_px=args.epi_band_px, w_epi_fine=args.w_epi_fine,
                             epi_fine_band_px=args.epi_fine_band_px)
    except ValueError as e:
        p.error(str(e))
    path = pretrain(cfg, args.out, resume=not args.no_resume,
                    time_budget_s=None if args.minutes is None else args.minutes * 60)
    print(f"model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
