"""Where mapping puts its landmarks before optimizing: a plane sweep over the mapping images.

A landmark is a mapping patch: its key is the patch's own descriptor (the
regressor's query of its feature), its position the patch's surface point.
The surface point is unknown (mapping has no depth), but the mapping poses
are known, so each candidate patch is swept along its viewing ray: at each of
a set of depths the 3D point is projected into a few neighbouring mapping
views, the descriptor there is sampled (bilinearly on the patch grid) and
compared by cosine with the patch's own. The depth where the neighbours agree best is the landmark's initial
depth. The descriptors compared come from the mapping images encoded at three times the
model's working resolution (``SweepConfig.scale``): a finer patch grid places the
agreement more precisely, while the landmark keys stay those of the working
resolution that queries are matched at. This is two-view-stereo triangulation with the pre-trained features
(trained for exactly this: dense correspondence between views); the
reprojection loss then refines keys and positions jointly.

Each sweep also returns its sharpness (best agreement minus the median over
depths); mapping can draw more candidates than it needs and keep the
sharpest (``SweepConfig.oversample``), though coverage measured as worth more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from aceg_model.encoder import STRIDE


# The largest SweepConfig.scale the tools offer: at 4 the sweep's keys of a 640x480 image are
# 2.5 MB and its encoding 16x the working one, for depths measured barely better than at 3.
MAX_SWEEP_SCALE = 4


@dataclass
class SweepConfig:
    # Views each candidate is compared against. Measured on generated rooms 900001 / 900003
    # (60 relit queries each, 5cm/5deg): 6 -> 73 / 57 %, 10 -> 83 / 62 %, 16 -> 83 / 63 %, with
    # the median pose error 3.5 / 4.2 cm -> 2.3 / 3.9 cm at 16; the sweep costs ~2x the time of 6.
    n_neighbours: int = 16
    min_baseline_m: float = 0.05  # closer views triangulate badly
    # Of the n_neighbours, up to n_wide are the best-ranked views at least wide_baseline_m away
    # (the rest as above): a depth from a wider baseline is less sensitive to the poses' errors
    # (a tracker's 3 mm is 4 % of an 8 cm baseline, 1.5 % of 20 cm). Measured on the walks
    # blk900011 / jitter900011 (true / jittered poses), two maps each, 5cm/5deg: 94.6 / 90.9 % at 0,
    # 94.8 / 90.8 % at 8, with 2 frames fewer without a pose on each; the mapping time the same.
    # (The NCC step compares against the sweep's views without the wide share: PhotoDepthConfig.n_wide.)
    n_wide: int = 8
    wide_baseline_m: float = 0.15
    max_angle_deg: float = 45.0  # optical axes further apart than this rarely see the same surface alike
    min_depth_m: float = 0.3
    max_depth_m: float = 12.0
    n_depths: int = 128  # uniform in inverse depth between the two (64: 2-3 points fewer inliers)
    # Candidates drawn per landmark kept (the sharpest sweeps win). 1 is the default: measured
    # on generated room 900001, keeping the sharpest of 2x or 4x candidates cost coverage and
    # matched no more patches.
    oversample: float = 1.0
    chunk: int = 256  # candidates per batch (memory: chunk x n_depths x n_neighbours x F floats)
    # The sweep compares descriptors of the mapping images encoded at this multiple of the model's
    # working height (the landmark keys stay at the working height, where queries are matched).
    # A finer patch grid locates the agreement more precisely. Generated room 900001 (640x480,
    # 4000 seeds against rendered depth), median depth error: 4.0 % at 1, 2.1 % at 2, 1.4 % at 3.
    # Four generated rooms, 320 relit queries, 5cm/5deg / 10cm/10deg: 50.6 / 74.4 % at 1,
    # 61.6 / 82.8 % at 2, 64.4 / 87.8 % at 3. Cost: encoding the mapping images scale^2 times
    # over, and their keys (500 frames at 3: ~0.7 GB in float16).
    scale: int = 3

    def __post_init__(self) -> None:
        if (self.n_neighbours < 1 or self.n_depths < 2 or self.oversample < 1.0 or self.chunk < 1
                or self.scale < 1):
            raise ValueError(f"invalid sweep settings {self}")
        if self.n_wide < 0 or self.wide_baseline_m < self.min_baseline_m:  # n_wide > n_neighbours: all wide
            raise ValueError(f"need n_wide >= 0 and wide_baseline_m >= min_baseline_m, got "
                             f"{self.n_wide}, {self.wide_baseline_m}, {self.min_baseline_m}")
        if not 0 < self.min_depth_m < self.max_depth_m:
            raise ValueError(f"need 0 < min_depth_m < max_depth_m, got {self.min_depth_m}, {self.max_depth_m}")


@dataclass
class SweepViews:
    """The mapping images as the sweep sees them: descriptors on each image's patch grid, encoded at
    ``scale`` x the model's working resolution, with the intrinsics of that resolution."""

    desc_IPD: torch.Tensor  # I x (h * w) x D, image-major
    hw: tuple[int, int]
    K_I33: torch.Tensor
    T_cam_map_I44: torch.Tensor
    scale: int

    def to_sweep_pixels(self, pixels_C2: torch.Tensor) -> torch.Tensor:
        """Working-resolution pixels -> this resolution (the same rays)."""
        return scaled_pixels(pixels_C2, self.scale)

    def sample(self, images_C: torch.Tensor, pixels_C2: torch.Tensor) -> torch.Tensor:
        """Bilinearly interpolated descriptors ``C x D`` at pixels of this resolution."""
        corners, weights, _ = bilinear_corners(pixels_C2, self.hw)
        return sum(wt[:, None] * self.desc_IPD[images_C, p].float() for p, wt in zip(corners, weights))


def neighbour_views(T_cam_map_I44: torch.Tensor, config: SweepConfig,
                    same_visit_II: torch.Tensor | None = None) -> torch.Tensor:
    """``I x n`` indices of each view's neighbours (-1 where there are fewer): the views at least
    ``min_baseline_m`` away with optical axes within ``max_angle_deg``, closest first. With
    ``same_visit_II`` (``aceg_model.visits``) the views of a view's own visit come first, and
    others only fill the places its visit leaves. With ``n_wide`` the first places go to the
    best-ranked of the views at least ``wide_baseline_m`` away (fewer where there are fewer)."""
    T_map_cam = torch.linalg.inv(T_cam_map_I44)
    centres_I3, axes_I3 = T_map_cam[:, :3, 3], T_map_cam[:, :3, 2]
    dist_II = torch.cdist(centres_I3, centres_I3)
    cos_II = axes_I3 @ axes_I3.T
    ok = (dist_II >= config.min_baseline_m) & (cos_II >= torch.cos(torch.deg2rad(torch.tensor(config.max_angle_deg))))
    # Most similar viewing direction first (the features match best); distance breaks ties.
    score = torch.where(ok, (1.0 - cos_II) + 0.01 * dist_II, torch.full_like(dist_II, float("inf")))
    if same_visit_II is not None:  # scores of valid pairs are below 1.2: 10 ranks every other visit last
        score = score + 10.0 * (~same_visit_II).to(score.dtype)
    n = min(config.n_neighbours, len(T_cam_map_I44) - 1)
    if config.n_wide:
        wide = torch.where(dist_II >= config.wide_baseline_m, score, torch.full_like(score, float("inf")))
        first = wide.argsort(dim=1)[:, :min(config.n_wide, n)]
        # Scores below 1.2 are valid views of the own visit (another visit adds 10): -100 puts the
        # chosen wide views first, and only those of the own visit, which keeps visits' precedence.
        bonus = torch.where(torch.gather(wide, 1, first) < 5.0, -100.0, 0.0)
        order = score.scatter_add(1, first, bonus).argsort(dim=1)[:, :n]
    else:
        order = score.argsort(dim=1)[:, :n]
    return torch.where(torch.gather(score, 1, order).isfinite(), order, torch.full_like(order, -1))


def parabola_vertex(centre: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Offset (in steps, within +-0.5) of the vertex of the parabola through three equally spaced
    scores; 0 where they do not form a maximum."""
    curvature = lower - 2 * centre + upper
    offset = 0.5 * (lower - upper) / curvature.clamp(max=-1e-6)
    return torch.where(curvature < -1e-6, offset, torch.zeros_like(centre)).clamp(-0.5, 0.5)


def scaled_pixels(pixels_b2: torch.Tensor, scale: float) -> torch.Tensor:
    """Pixels of an image -> pixels of the same image resized by ``scale`` (pixel-centre
    convention: the same rays)."""
    return (pixels_b2 + 0.5) * scale - 0.5


def patch_grid_coords(pixels_b2: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels -> coordinates on an ``h x w`` patch grid (patch centres at integers), and whether
    each lies inside the grid."""
    h, w = hw
    g = (pixels_b2 - (STRIDE - 1) / 2.0) / STRIDE
    return g, (g[..., 0] >= 0) & (g[..., 0] <= w - 1) & (g[..., 1] >= 0) & (g[..., 1] <= h - 1)


def bilinear_corners(pixels_b2: torch.Tensor, hw: tuple[int, int]
              ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:
    """Bilinear sampling of the patch grid at pixels (clamped to the grid): the flat indices of the
    four corners of each pixel's cell (top-left, top-right, bottom-left, bottom-right), their
    weights in the same order, and whether the pixel is inside the grid."""
    h, w = hw
    g, inside = patch_grid_coords(pixels_b2, hw)
    gx, gy = g[..., 0].clamp(0, w - 1), g[..., 1].clamp(0, h - 1)
    x0, y0 = gx.floor().long().clamp(max=w - 2), gy.floor().long().clamp(max=h - 2)
    fx, fy = gx - x0, gy - y0
    pa = y0 * w + x0
    return ((pa, pa + 1, pa + w, pa + w + 1),
            ((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), inside)


def neighbour_dots(desc_IhwF: torch.Tensor, images_per_batch: int = 32) -> torch.Tensor:
    """``I x 5 x h x w`` dot products between each patch descriptor and its grid neighbours: with
    itself, right, below, below-right, and (right) x (below), i.e. every pair of corners of the
    cell whose top-left corner it is (zero where a neighbour is off the grid)."""
    I, h, w, _ = desc_IhwF.shape
    out = desc_IhwF.new_zeros(I, 5, h, w, dtype=torch.float32)
    for s in range(0, I, images_per_batch):
        d = desc_IhwF[s:s + images_per_batch].float()
        o = out[s:s + images_per_batch]
        o[:, 0] = (d * d).sum(-1)
        o[:, 1, :, :-1] = (d[:, :, :-1] * d[:, :, 1:]).sum(-1)
        o[:, 2, :-1] = (d[:, :-1] * d[:, 1:]).sum(-1)
        o[:, 3, :-1, :-1] = (d[:, :-1, :-1] * d[:, 1:, 1:]).sum(-1)
        o[:, 4, :-1, :-1] = (d[:, :-1, 1:] * d[:, 1:, :-1]).sum(-1)
    return out


def interpolated_cosines(own_kF: torch.Tensor, desc_nPF: torch.Tensor, dots_n5P: torch.Tensor,
                         hw: tuple[int, int], pixels_knd2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine between each unit descriptor ``own_kF`` and the bilinearly interpolated descriptor of
    each of n images at pixels ``k x n x d`` (sampling the descriptors, then the cosine, to float rounding),
    and the inside mask.

    The interpolation is linear, so <own, interp> is the interpolation of the k x n x P scores of
    one matmul, and |interp|^2 a weighted sum of the corners' dot products (``neighbour_dots``):
    scalars are gathered instead of descriptors (~25x less memory traffic; the sweep's main cost)."""
    h, w = hw
    k, n, d, _ = pixels_knd2.shape
    corners, weights, inside = bilinear_corners(pixels_knd2, hw)
    scores_knP = torch.einsum("kf,npf->knp", own_kF, desc_nPF.float())
    dots = dots_n5P.unsqueeze(0).expand(k, n, 5, h * w)
    return bilinear_cosine(corners, weights, lambda p: scores_knP.gather(2, p),
                           lambda j, p: dots[:, :, j].gather(2, p)), inside


def bilinear_cosine(corners: tuple[torch.Tensor, ...], weights: tuple[torch.Tensor, ...],
                    score: Callable[[torch.Tensor], torch.Tensor],
                    dot: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Cosine between a unit descriptor and the bilinear interpolation of four grid descriptors,
    from scalars only: ``score(corner)`` is the descriptor's dot product with a corner's
    descriptor, ``dot(j, corner)`` the corner's entry j of ``neighbour_dots``; ``corners`` and
    ``weights`` as ``bilinear_corners`` gives them."""
    (pa, pb, pc, pd), (wa, wb, wc, wd) = corners, weights
    num = wa * score(pa) + wb * score(pb) + wc * score(pc) + wd * score(pd)
    sq = (wa * wa * dot(0, pa) + wb * wb * dot(0, pb) + wc * wc * dot(0, pc) + wd * wd * dot(0, pd)
          + 2 * (wa * wb * dot(1, pa) + wc * wd * dot(1, pc) + wa * wc * dot(2, pa) + wb * wd * dot(2, pb)
                 + wa * wd * dot(3, pa) + wb * wc * dot(4, pa)))
    return num / sq.clamp(min=0).sqrt().clamp(min=1e-12)


@torch.no_grad()
def sweep_depths(views: SweepViews, images_C: torch.Tensor, pixels_C2: torch.Tensor,
                 config: SweepConfig | None = None, progress: Callable[[int, int], None] | None = None,
                 neighbours_In: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best depth (m) and its sharpness per candidate: a pixel (working resolution) of a mapping image.

    The candidate's own descriptor is ``views``' descriptor at that pixel (bilinear; at scale 1
    and a patch centre, the patch's own). Sharpness is the best mean cosine minus the median
    over depths: high where one depth explains the neighbours much better than the others.
    Candidates with no usable neighbour get depth ``NaN`` and sharpness ``-inf``.
    ``progress(done, total)`` is called after every chunk (it may raise to cancel).
    ``neighbours_In``: ``neighbour_views(views.T_cam_map_I44, config)`` where the caller has it.
    """
    cfg = config or SweepConfig()
    desc_IPF, hw, K_I33, T_cam_map_I44 = views.desc_IPD, views.hw, views.K_I33, views.T_cam_map_I44
    device = desc_IPF.device
    h, w = hw
    I = len(T_cam_map_I44)
    pixels_C2 = views.to_sweep_pixels(pixels_C2)
    dots_I5P = neighbour_dots(desc_IPF.view(I, h, w, -1)).view(I, 5, h * w)
    neigh_In = neighbour_views(T_cam_map_I44, cfg) if neighbours_In is None else neighbours_In
    n = neigh_In.shape[1]
    inv_d = torch.linspace(1.0 / cfg.min_depth_m, 1.0 / cfg.max_depth_m, cfg.n_depths, device=device)
    depths_D = 1.0 / inv_d
    T_map_cam_I44 = torch.linalg.inv(T_cam_map_I44)
    Kinv_I33 = torch.linalg.inv(K_I33)
    best_depth = torch.full((len(images_C),), float("nan"), device=device)
    sharpness = torch.full((len(images_C),), float("-inf"), device=device)
    # Candidates of one image share its neighbours: one score matmul per image and chunk.
    order = images_C.argsort(stable=True)
    images, counts = torch.unique_consecutive(images_C[order], return_counts=True)
    done, start = 0, 0
    for img, count in zip(images.tolist(), counts.tolist()):
        nb = neigh_In[img]
        nbc = nb.clamp(min=0)
        Tn = T_cam_map_I44[nbc]  # n x 4 x 4
        T = T_map_cam_I44[img]
        # The neighbours' descriptors in float32 and their corner dots, gathered once for all of
        # this image's chunks (converting per chunk was a fifth of the sweep's time).
        desc_nPF, dots_n5P = desc_IPF[nbc].float(), dots_I5P[nbc]
        for s in range(start, start + count, cfg.chunk):
            rows = order[s:min(s + cfg.chunk, start + count)]
            c, D = len(rows), cfg.n_depths
            ray_c3 = F.pad(pixels_C2[rows], (0, 1), value=1.0) @ Kinv_I33[img].T
            pts_map_cD3 = (ray_c3.unsqueeze(1) * depths_D.view(1, D, 1)) @ T[:3, :3].T + T[:3, 3]
            pts_nb = torch.einsum("nij,cdj->cndi", Tn[:, :3, :3], pts_map_cD3) + Tn[None, :, None, :3, 3]
            z = pts_nb[..., 2]
            uv = torch.einsum("nij,cndj->cndi", K_I33[nbc], pts_nb)
            uv = uv[..., :2] / uv[..., 2:].clamp(min=1e-6)
            own = F.normalize(views.sample(images_C[rows], pixels_C2[rows]), dim=-1)
            cos, inside = interpolated_cosines(own, desc_nPF, dots_n5P, hw, uv)
            valid = inside & (z > 0.05) & (nb >= 0).view(1, n, 1)
            cnt = valid.sum(dim=1)  # c x D
            mean_cos = (cos * valid).sum(dim=1) / cnt.clamp(min=1)
            # A depth seen by fewer than two neighbours is not a triangulation.
            mean_cos = torch.where(cnt >= min(2, n), mean_cos, torch.full_like(mean_cos, float("-inf")))
            best, arg = mean_cos.max(dim=1)
            med = torch.where(mean_cos.isfinite(), mean_cos, torch.nan).nanmedian(dim=1).values
            ok = best.isfinite()
            # Sub-step refinement: the vertex of the parabola through the best score and its two
            # neighbours, in inverse depth (the steps are ~5 % of the depth at 2 m).
            lo, hi = (arg - 1).clamp(min=0), (arg + 1).clamp(max=D - 1)
            s_lo, s_hi = mean_cos.gather(1, lo[:, None])[:, 0], mean_cos.gather(1, hi[:, None])[:, 0]
            interior = (lo < arg) & (hi > arg) & s_lo.isfinite() & s_hi.isfinite()
            shift = torch.where(interior, parabola_vertex(best, s_lo, s_hi), torch.zeros_like(best))
            step = inv_d[1] - inv_d[0]
            depth = 1.0 / (inv_d[arg] + shift * step)
            best_depth[rows] = torch.where(ok, depth, torch.full_like(best, float("nan")))
            sharpness[rows] = torch.where(ok, best - med, torch.full_like(best, float("-inf")))
            done += c
            if progress:
                progress(done, len(images_C))
        start += count
    return best_depth, sharpness
