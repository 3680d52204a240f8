"""Ray casting of textured quads in torch: RGB, depth, scene coordinates, surface ids.

One ray per pixel centre; for each ray the nearest quad it hits (back faces
and quads outside the view are culled first). Rays are not normalized: the
camera-frame direction is ``((u - cx) / fx, (v - cy) / fy, 1)``, so the ray
parameter of a hit *is* its depth along the optical axis, and back-projecting
the depth with the pose gives the scene coordinate exactly.

Textures are sampled trilinearly from a per-quad mip pyramid (level chosen
from the pixel footprint), so distant and oblique surfaces do not alias and
two views of one surface point agree in colour. Shading is Lambertian
(view-independent, as ACE-G's mapping assumes) from ambient light, point or
directional lights, with optional cast shadows.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from aceg_model.frames import Frame, Intrinsics
from aceg_model.scene.layout import Layout, Lighting
from aceg_model.scene.textures import make_texture

MIP_LEVELS = 4  # texture sizes are padded to multiples of 2**(MIP_LEVELS-1)
NEAR_M = 0.02  # hits closer than this are ignored
MAX_RAY_QUADS = 1 << 20  # rays x quads per intersection chunk (~4 MB per temporary)
PIXEL_CHUNK = 1 << 17  # rays shaded at once (beyond this, temporaries fall out of cache)


@dataclass
class Scene:
    """A renderable scene: its layout (numpy, for planning) and its quads and textures (torch)."""

    layout: Layout
    origin_Q3: torch.Tensor
    axis_u_Q3: torch.Tensor
    axis_v_Q3: torch.Tensor
    normal_Q3: torch.Tensor
    size_Q2: torch.Tensor
    px_per_m_Q: torch.Tensor
    casts_shadow_Q: torch.Tensor  # bool
    tex_packed_N: torch.Tensor  # int32 RGB texels (r | g << 8 | b << 16) of every quad and mip level, row-major
    tex_base_QL: torch.Tensor  # int64 index of texel (0, 0) of quad q at level l in tex_packed_N
    tex_w_QL: torch.Tensor  # int64 width in texels of quad q at level l
    tex_h_QL: torch.Tensor
    tex_info_QL3: torch.Tensor = field(init=False)  # (base, w, h): one gather instead of three

    def __post_init__(self) -> None:
        self.tex_info_QL3 = torch.stack([self.tex_base_QL, self.tex_w_QL, self.tex_h_QL], -1)

    @property
    def lighting(self) -> Lighting:
        return self.layout.lighting

    @property
    def n_texels(self) -> int:
        return int(self.tex_packed_N.shape[0])


def texture_size(size_m: np.ndarray, px_per_m: float) -> tuple[int, int]:
    """(w, h) in texels of a quad's texture: its extent at ``px_per_m``, padded for the mips."""
    step = 2 ** (MIP_LEVELS - 1)
    w, h = (int(np.ceil(max(s * px_per_m, 1.0) / step) * step) for s in size_m)
    return w, h


def build_scene(layout: Layout, rng: np.random.Generator, photos: list[str] | tuple[str, ...]) -> Scene:
    """Make a unique texture (and its mips) for every quad of ``layout``."""
    q, photos = layout.quads, tuple(photos)
    chunks, base, widths, heights, offset = [], [], [], [], 0
    for i in range(len(q)):
        w, h = texture_size(q.size_Q2[i], q.px_per_m_Q[i])
        image = make_texture(h, w, q.px_per_m_Q[i], q.material[i], rng, photos, decals=int(q.decals_Q[i]))
        row_b, row_w, row_h = [], [], []
        for _ in range(MIP_LEVELS):
            row_b.append(offset)
            row_w.append(image.shape[1])
            row_h.append(image.shape[0])
            chunks.append(image.reshape(-1, 3))
            offset += image.shape[0] * image.shape[1]
            image = cv2.resize(image, (max(1, image.shape[1] // 2), max(1, image.shape[0] // 2)),
                               interpolation=cv2.INTER_AREA)
        base.append(row_b), widths.append(row_w), heights.append(row_h)

    def f32(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32)

    return Scene(
        layout, f32(q.origin_Q3), f32(q.axis_u_Q3), f32(q.axis_v_Q3), f32(q.normal_Q3), f32(q.size_Q2),
        f32(q.px_per_m_Q), torch.from_numpy(q.casts_shadow_Q.copy()),
        torch.from_numpy(pack_rgb(np.concatenate(chunks))),
        torch.tensor(base), torch.tensor(widths),
        torch.tensor(heights),
    )


def pack_rgb(rgb_N3: np.ndarray) -> np.ndarray:
    """uint8 N x 3 -> int32 N (one gather fetches a whole texel)."""
    rgb = rgb_N3.astype(np.int32)
    return rgb[:, 0] | (rgb[:, 1] << 8) | (rgb[:, 2] << 16)


# ---------------------------------------------------------------------------
# Intersection


def intersect(scene: Scene, origin_R3: torch.Tensor, dir_R3: torch.Tensor, quads_K: torch.Tensor,
              t_max_R: torch.Tensor | None = None, any_hit: bool = False):
    """Nearest hit of each ray among quads ``quads_K`` (indices into the scene).

    Returns (t_R, quad_R, u_R, v_R): the ray parameter (inf when nothing is
    hit), the quad index (-1) and the hit's position on the quad (metres along
    its u and v axes). With ``any_hit``, returns a bool_R "hit anything before
    ``t_max_R``" instead (shadow rays).
    """
    R = dir_R3.shape[0]
    o_K3, n_K3 = scene.origin_Q3[quads_K], scene.normal_Q3[quads_K]
    u_K3, v_K3, size_K2 = scene.axis_u_Q3[quads_K], scene.axis_v_Q3[quads_K], scene.size_Q2[quads_K]
    axes_3X = torch.cat([n_K3, u_K3, v_K3]).T  # 3 x 3K: normal, u and v axes of every quad
    offs_X = (o_K3 * torch.cat([n_K3, u_K3, v_K3]).view(3, -1, 3)).sum(-1).reshape(-1)
    K = len(quads_K)
    t_out = torch.full((R,), float("inf"))
    q_out = torch.full((R,), -1, dtype=torch.long)
    u_out, v_out = torch.zeros(R), torch.zeros(R)
    hit_out = torch.zeros(R, dtype=torch.bool)
    chunk = max(1, MAX_RAY_QUADS // max(K, 1))
    for s in range(0, R, chunk):
        d = dir_R3[s : s + chunk] @ axes_3X  # r x 3K: ray direction along each axis
        p = (origin_R3[s : s + chunk] @ axes_3X if origin_R3.shape[0] > 1 else origin_R3 @ axes_3X) - offs_X
        dn, du, dv = d[:, :K], d[:, K : 2 * K], d[:, 2 * K :]
        pn, pu, pv = p[:, :K], p[:, K : 2 * K], p[:, 2 * K :]
        t = -pn / dn  # r x K: where each ray meets each quad's plane
        u = pu + t * du
        v = pv + t * dv
        ok = (t > NEAR_M) & (u >= 0) & (u <= size_K2[:, 0]) & (v >= 0) & (v <= size_K2[:, 1])
        if any_hit:
            ok &= t < t_max_R[s : s + chunk, None]
            hit_out[s : s + chunk] = ok.any(dim=1)
            continue
        t = torch.where(ok, t, torch.inf)
        t_min, k = t.min(dim=1)
        t_out[s : s + chunk] = t_min
        q_out[s : s + chunk] = torch.where(torch.isfinite(t_min), quads_K[k], -1)
        u_out[s : s + chunk] = u.gather(1, k[:, None])[:, 0]
        v_out[s : s + chunk] = v.gather(1, k[:, None])[:, 0]
    return hit_out if any_hit else (t_out, q_out, u_out, v_out)


def visible_quads(scene: Scene, T_world_cam: torch.Tensor, intr: Intrinsics) -> torch.Tensor:
    """Indices of quads that face the camera and may fall in its view (a conservative cull)."""
    R, c = T_world_cam[:3, :3], T_world_cam[:3, 3]
    facing = ((c - scene.origin_Q3) * scene.normal_Q3).sum(-1) > 1e-6
    # Corners in the camera frame; cull quads entirely behind or entirely off one image side.
    o, u, v, s = scene.origin_Q3, scene.axis_u_Q3, scene.axis_v_Q3, scene.size_Q2
    corners_Q43 = torch.stack([o, o + u * s[:, :1], o + v * s[:, 1:], o + u * s[:, :1] + v * s[:, 1:]], 1)
    cam_Q43 = (corners_Q43 - c) @ R
    z = cam_Q43[..., 2]
    behind = (z < NEAR_M).all(1)
    zc = z.clamp(min=NEAR_M)
    x = (cam_Q43[..., 0] / zc) * intr.fx + intr.cx
    y = (cam_Q43[..., 1] / zc) * intr.fy + intr.cy
    all_front = (z > NEAR_M).all(1)
    off = all_front & ((x < -1).all(1) | (x > intr.width).all(1) | (y < -1).all(1) | (y > intr.height).all(1))
    return torch.nonzero(facing & ~behind & ~off).flatten()


# ---------------------------------------------------------------------------
# Texturing and shading


def sample_texture(scene: Scene, quad_P: torch.Tensor, s_P: torch.Tensor, t_P: torch.Tensor,
                   level_P: torch.Tensor) -> torch.Tensor:
    """Trilinear texture lookup, P x 3 in [0, 1]; ``s, t`` are level-0 texel coordinates (corner convention)."""
    level_P = level_P.clamp(0, MIP_LEVELS - 1)
    l0 = level_P.floor().long().clamp(max=MIP_LEVELS - 2)
    frac = level_P - l0
    idx0_4P, w0_4P = _bilinear_taps(scene, quad_P, s_P, t_P, l0)
    idx1_4P, w1_4P = _bilinear_taps(scene, quad_P, s_P, t_P, l0 + 1)
    # One gather of 8 packed RGB texels per pixel, then unpack each byte and blend.
    texel_8P = scene.tex_packed_N[torch.cat([idx0_4P, idx1_4P])]
    weight_8P = torch.cat([w0_4P * (1 - frac), w1_4P * frac]) / 255.0
    channels = ((texel_8P >> shift) & 255 for shift in (0, 8, 16))
    return torch.stack([(weight_8P * c).sum(0) for c in channels], 1)


def _bilinear_taps(scene, quad_P, s_P, t_P, l_P):
    """Flat texel indices (4 x P) and weights (4 x P) of the bilinear taps at mip level ``l_P``."""
    scale = torch.exp2(-l_P.float())
    base, w, h = scene.tex_info_QL3[quad_P, l_P].unbind(1)
    x = (s_P * scale - 0.5).clamp(min=0).minimum(w - 1)
    y = (t_P * scale - 0.5).clamp(min=0).minimum(h - 1)
    x0, y0 = x.long(), y.long()  # floor: x, y >= 0
    x1, y1 = (x0 + 1).minimum(w - 1), (y0 + 1).minimum(h - 1)
    fx, fy = x - x0, y - y0
    row0, row1 = base + y0 * w, base + y1 * w
    idx_4P = torch.stack([row0 + x0, row0 + x1, row1 + x0, row1 + x1])
    w_4P = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    return idx_4P, w_4P


def shade(scene: Scene, lighting: Lighting, point_P3: torch.Tensor, normal_P3: torch.Tensor,
          shadows: bool) -> torch.Tensor:
    """Irradiance (RGB, ~[0, 1.5]) at surface points with normals facing the viewer."""
    irr = torch.tensor(lighting.ambient_rgb, dtype=torch.float32).expand(point_P3.shape[0], 3).clone()
    for light in lighting.lights:
        if light.directional:
            sun = -torch.tensor(light.position, dtype=torch.float32)
            to_light = (sun / sun.norm()).expand_as(point_P3)
            dist = torch.full((point_P3.shape[0],), 1e4)
            lit = (normal_P3 @ to_light[0]).clamp(min=0)
        else:
            to_light = torch.tensor(light.position, dtype=torch.float32) - point_P3
            dist = to_light.norm(dim=1)
            # Lambert's cosine times a falloff that halves the light at `falloff_m`.
            lit = ((normal_P3 * to_light).sum(1) / dist).clamp(min=0) / (1.0 + (dist / light.falloff_m) ** 2)
        if shadows and light.shadows:
            # Shadow rays from just off the surface towards the light; occluded points get ambient only.
            idx = torch.nonzero(lit > 1e-3).flatten()
            if len(idx):
                dir_ = to_light[idx]
                t_max = dist[idx] if light.directional else torch.full((len(idx),), 1.0 - 1e-3)
                occ = intersect(scene, point_P3[idx] + 1e-3 * normal_P3[idx], dir_, _facing(scene, light),
                                t_max, any_hit=True)
                lit[idx[occ]] = 0.0
        irr += lit[:, None] * torch.tensor(light.rgb, dtype=torch.float32)
    return irr


def _facing(scene: Scene, light) -> torch.Tensor:
    """Shadow casters facing a light: the only quads that can block it (solids are closed)."""
    if light.directional:
        facing = (scene.normal_Q3 @ -torch.tensor(light.position, dtype=torch.float32)) > 0
    else:
        facing = ((torch.tensor(light.position, dtype=torch.float32) - scene.origin_Q3) * scene.normal_Q3).sum(1) > 0
    return torch.nonzero(facing & scene.casts_shadow_Q).flatten()


# ---------------------------------------------------------------------------
# Rendering


@dataclass
class Render:
    """Render outputs as tensors. Pixels that hit nothing: depth 0, coords NaN, surface -1."""

    rgb_HW3: torch.Tensor  # float32 in [0, 1]
    depth_HW: torch.Tensor  # float32 metres along the optical axis
    coords_HW3: torch.Tensor  # float32 world (scene) coordinates, metres
    surface_HW: torch.Tensor  # int64 quad index


@functools.lru_cache(maxsize=8)
def _pixel_rays(intr: Intrinsics) -> torch.Tensor:
    v, u = torch.meshgrid(torch.arange(intr.height, dtype=torch.float32),
                          torch.arange(intr.width, dtype=torch.float32), indexing="ij")
    return torch.stack([(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, torch.ones_like(u)], -1).reshape(-1, 3)


def camera_rays(T_world_cam_44: torch.Tensor, intr: Intrinsics) -> tuple[torch.Tensor, torch.Tensor]:
    """(origin 1x3, directions HW x 3) in the world frame, camera-frame z component 1."""
    return T_world_cam_44[:3, 3].reshape(1, 3), _pixel_rays(intr) @ T_world_cam_44[:3, :3].T


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch threads (None: unchanged), then restore the caller's setting."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def render_tensors(scene: Scene, T_world_cam: np.ndarray, intrinsics: Intrinsics,
                   lighting: Lighting | None = None, shadows: bool = True, threads: int | None = 1) -> Render:
    """Render one view; ``lighting`` overrides the scene's own (query relighting).

    ``threads``: torch threads while rendering. One by default: on 2 shared cores
    the many small ops ran 4x faster single-threaded than with 2 threads under
    load; use more cores by rendering in several worker processes.
    """
    with torch_threads(threads):
        return _render(scene, T_world_cam, intrinsics, lighting or scene.lighting, shadows)


def _render(scene, T_world_cam, intrinsics, lighting, shadows) -> Render:
    T_44 = torch.as_tensor(np.asarray(T_world_cam), dtype=torch.float32)
    H, W = intrinsics.height, intrinsics.width
    f_mean = 0.5 * (intrinsics.fx + intrinsics.fy)
    rgb, depth = torch.empty(H * W, 3), torch.empty(H * W)
    coords, surface = torch.empty(H * W, 3), torch.empty(H * W, dtype=torch.long)
    with torch.no_grad():
        origin_13, dir_P3 = camera_rays(T_44, intrinsics)
        quads_K = visible_quads(scene, T_44, intrinsics)
        # Pixel chunks keep every temporary small enough to stay in cache.
        for s in range(0, H * W, PIXEL_CHUNK):
            sl = slice(s, s + PIXEL_CHUNK)
            rgb[sl], depth[sl], coords[sl], surface[sl] = _render_rays(
                scene, origin_13, dir_P3[sl], quads_K, f_mean, lighting, shadows)
    return Render(rgb.reshape(H, W, 3), depth.reshape(H, W), coords.reshape(H, W, 3), surface.reshape(H, W))


def _render_rays(scene, origin_13, dir_P3, quads_K, f_mean, lighting, shadows):
    """(rgb P3 in [0, 1], depth P, coords P3, surface P) of one chunk of camera rays."""
    t_P, quad_P, u_P, v_P = intersect(scene, origin_13, dir_P3, quads_K)
    P = dir_P3.shape[0]
    hit = torch.nonzero(quad_P >= 0).flatten()
    everything = len(hit) == P  # indoors every ray hits: skip the copies
    q, t, d = (quad_P, t_P, dir_P3) if everything else (quad_P[hit], t_P[hit], dir_P3[hit])
    u, v = (u_P, v_P) if everything else (u_P[hit], v_P[hit])
    point_H3 = origin_13 + t[:, None] * d
    # Mip level from the pixel footprint on the surface (geometric mean of its two axes).
    ppm, normal = scene.px_per_m_Q[q], scene.normal_Q3[q]
    d_norm = d.norm(dim=1)
    d_dot_n = (normal * d).sum(1)
    cos = (d_dot_n / d_norm).abs().clamp(min=0.05)
    footprint_m = t / (f_mean * d_norm) / cos.sqrt()
    albedo = sample_texture(scene, q, u * ppm, v * ppm, torch.log2((footprint_m * ppm).clamp(min=1e-6)))
    # Light the side the camera sees.
    normal = torch.where((d_dot_n < 0)[:, None], normal, -normal)
    colour = albedo * shade(scene, lighting, point_H3, normal, shadows)

    if everything:
        return colour.clamp(0, 1), t, point_H3, quad_P
    rgb = torch.zeros(P, 3)
    if lighting.sky_rgb is not None:
        # A simple sky: brighter towards the horizon.
        elev = (dir_P3[:, 2] / dir_P3.norm(dim=1)).clamp(0, 1)[:, None]
        rgb[:] = torch.tensor(lighting.sky_rgb) * (1.15 - 0.4 * elev)
    rgb[hit] = colour
    depth = torch.zeros(P)
    depth[hit] = t
    coords = torch.full((P, 3), float("nan"))
    coords[hit] = point_H3
    return rgb.clamp(0, 1), depth, coords, quad_P


def render_view(scene: Scene, T_world_cam: np.ndarray, intrinsics: Intrinsics, lighting: Lighting | None = None,
                shadows: bool = True, name: str = "", stamp: float = 0.0, threads: int | None = 1) -> Frame:
    """Render one view as a `Frame`: uint8 RGB, float32 depth (0 where nothing is hit),
    ``meta['scene_coords']`` HxWx3 float32 (NaN where nothing is hit) and
    ``meta['surface_ids']`` HxW int32 (-1)."""
    r = render_tensors(scene, T_world_cam, intrinsics, lighting, shadows, threads)
    image = (r.rgb_HW3.numpy() * 255.0 + 0.5).astype(np.uint8)
    meta = {"scene_coords": r.coords_HW3.numpy(), "surface_ids": r.surface_HW.numpy().astype(np.int32)}
    return Frame(image, intrinsics, np.asarray(T_world_cam, dtype=np.float64), stamp, r.depth_HW.numpy(), name, meta)
