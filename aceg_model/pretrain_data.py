"""Views of generated scenes for pre-training (``aceg_model.scene`` does the rendering).

Each scene is rendered once when it enters the pool, at the model's working
resolution: a mapping sequence under the scene's light, and query sequences
under relit scenes and from off-path viewpoints, with the change drawn per
scene. Photometric changes are applied on the fly when a view is sampled:
mild ones on mapping views (augmentation), strong ones on query views
(``random_strong``: gain x0.08-3, gamma 0.4-2.5, coloured light, noise, blur).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from aceg_model.encoder import patch_centres
from aceg_model.frames import Frame, Intrinsics
from aceg_model.geometry import invert
from aceg_model.scene import PRESETS, QuerySpec, SceneConfig, correspondences, generate_scene, scene_coords

View = Frame  # a rendered view: image, intrinsics, pose, depth, meta['scene_coords']


def scene_config(rng: np.random.Generator, height: int, mapping_frames: int, query_frames: int) -> SceneConfig:
    """A generator config with query conditions drawn at random for one scene."""
    width = round(height * 4 / 3 / 8) * 8  # 4:3 and a multiple of the encoder stride
    lighting = QuerySpec(n_frames=query_frames, light_gain=float(np.exp(rng.uniform(np.log(0.3), np.log(1.6)))),
                         light_tint=tuple(float(g) for g in np.exp(rng.normal(0, 0.15, 3))),
                         light_move_m=float(rng.uniform(0, 2.0)), sun_move_deg=float(rng.uniform(0, 90)),
                         lateral_offset_m=float(rng.uniform(0, 0.2)))
    viewpoint = QuerySpec(n_frames=query_frames, same_path=bool(rng.random() < 0.5),
                          lateral_offset_m=float(rng.uniform(0, 0.5)), height_offset_m=float(rng.uniform(-0.3, 0.3)),
                          yaw_offset_deg=float(rng.uniform(-30, 30)), light_gain=float(rng.uniform(0.6, 1.2)))
    scale = height / 480.0
    return SceneConfig(width=width, height=height, focal_range_px=(500.0 * scale, 600.0 * scale),
                       mapping_frames=mapping_frames, queries={"lighting": lighting, "viewpoint": viewpoint},
                       max_texels=6_000_000)


@dataclass
class SceneViews:
    seed: int
    mapping: list[View]
    queries: list[View]
    centre_3: np.ndarray
    # V x V angles between the views (pair_angles), mapping views first; computed on first use.
    _angles: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def generate(cls, seed: int, height: int, mapping_frames: int = 40, query_frames: int = 15) -> "SceneViews":
        cfg = scene_config(np.random.default_rng(seed + 12345), height, mapping_frames, query_frames)
        g = generate_scene(seed, cfg)
        queries = [f for frames in g.queries.values() for f in frames]
        centre = np.mean([f.T_world_cam[:3, 3] for f in g.mapping], axis=0)
        return cls(seed, g.mapping, queries, centre)

    def mapping_view(self, rng: np.random.Generator) -> View:
        return self._mapping_view(int(rng.integers(len(self.mapping))), rng)

    def query_view(self, rng: np.random.Generator) -> View:
        return self._query_view(int(rng.integers(len(self.queries))), rng)

    def _mapping_view(self, i: int, rng: np.random.Generator) -> View:
        view = self.mapping[i]
        return view.with_image(PRESETS["random_mild"].apply(view.image, rng))

    def _query_view(self, i: int, rng: np.random.Generator) -> View:
        view = self.queries[i]
        return view.with_image(PRESETS["random_strong"].apply(view.image, rng))

    def angles(self) -> np.ndarray:
        """V x V surface angles between all views (mapping views first), see ``pair_angles``."""
        if self._angles is None:
            self._angles = pair_angles(self.mapping + self.queries, np.random.default_rng(self.seed))
        return self._angles

    def view_pair(self, query: bool, rng: np.random.Generator, wide_prob: float = 0.0,
                  wide_deg: tuple[float, float] = (20.0, 60.0)) -> tuple[View, View]:
        """A mapping view and a second view of the same scene: a mapping view, or with ``query``
        a query view under a strong photometric change.

        With probability ``wide_prob`` the pair is drawn among those whose views see the same
        surfaces from ``wide_deg`` degrees apart (``pair_angles``), where the scene has any: the
        out-of-plane viewpoint changes that random pairs seldom give. Otherwise, and always with
        ``wide_prob`` 0, the draws are those of ``mapping_view`` and ``query_view``.
        """
        if wide_prob > 0 and rng.random() < wide_prob:
            n_map = len(self.mapping)
            block = self.angles()[:n_map, n_map:] if query else self.angles()[:n_map, :n_map]
            with np.errstate(invalid="ignore"):  # NaN: the views do not overlap
                pairs = np.argwhere((block >= wide_deg[0]) & (block <= wide_deg[1]))
            if len(pairs):
                i, j = (int(k) for k in pairs[rng.integers(len(pairs))])
                return self._mapping_view(i, rng), (self._query_view(j, rng) if query else self._mapping_view(j, rng))
        return self.mapping_view(rng), (self.query_view(rng) if query else self.mapping_view(rng))


def pair_angles(views: list[View], rng: np.random.Generator, n: int = 64, min_overlap: float = 0.25) -> np.ndarray:
    """V x V median angle (degrees) at the surface between the two cameras' rays to the points
    of view a that view b also sees; NaN where fewer than ``min_overlap`` of ``n`` pixels drawn
    in a are visible in b (and on the diagonal).

    The angle is how differently the two views look at the same surfaces: a sideways step or
    a turn around an object makes it large, a step along the viewing direction keeps it small.
    """
    V = len(views)
    out = np.full((V, V), np.nan)
    centres = [v.T_world_cam[:3, 3] for v in views]
    for a, va in enumerate(views):
        coords = scene_coords(va)
        for b, vb in enumerate(views):
            if a == b:
                continue
            uv_a, _ = correspondences(va, vb, n, rng, candidates=1)
            if len(uv_a) < min_overlap * n:
                continue
            X = coords[uv_a[:, 1].astype(int), uv_a[:, 0].astype(int)].astype(np.float64)
            ra, rb = X - centres[a], X - centres[b]
            cos = (ra * rb).sum(1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1))
            out[a, b] = np.degrees(np.median(np.arccos(np.clip(cos, -1, 1))))
    return out


def zoomed_and_rolled(view: View, scale: float, roll_deg: float) -> View:
    """``view`` as seen by the same camera turned ``roll_deg`` about its optical axis and with its
    focal length times ``scale``.

    Neither change moves the camera centre, so the new image is an exact warp of the rendered one
    (no parallax) and its scene coordinates and depths (depth along the optical axis does not
    change under a roll) move with it: the correspondence loss then sees the scale and in-plane
    rotation differences a handheld camera brings back to a place, beyond those of the rendered
    paths. Pixels the warp brings in from outside the render have no surface (NaN, depth 0).
    """
    import cv2

    K = view.intrinsics
    a = np.deg2rad(roll_deg)
    # Camera turned by Rz(a): a point's camera coordinates turn by Rz(-a); pixels about (cx, cy).
    A = scale * np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    c = np.array([K.cx, K.cy])
    M = np.hstack([A, (c - A @ c)[:, None]])
    size = (K.width, K.height)
    image = cv2.warpAffine(view.image, M, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    depth = cv2.warpAffine(view.depth.astype(np.float32), M, size, flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    coords = cv2.warpAffine(view.meta["scene_coords"].astype(np.float32), M, size, flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(float("nan"),) * 3)
    coords[depth <= 0] = np.nan
    R = np.eye(4)
    R[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return replace(view, image=image, depth=depth, intrinsics=replace(K, fx=K.fx * scale, fy=K.fy * scale),
                   T_world_cam=view.T_world_cam @ R, meta={**view.meta, "scene_coords": coords})


def patch_coords(view: View, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scene coordinates P x 3 at the centres of an h x w patch grid, NaN where nothing was hit;
    the patch-centre pixels P x 2), row-major like the encoder's flattened features."""
    pix_P2 = patch_centres(h, w)
    H, W = view.meta["scene_coords"].shape[:2]
    u = pix_P2[:, 0].round().long().clamp(0, W - 1)
    v = pix_P2[:, 1].round().long().clamp(0, H - 1)
    return torch.from_numpy(view.meta["scene_coords"])[v, u], pix_P2


def T_cam_map(view: View, centre_3: np.ndarray) -> np.ndarray:
    """World-to-camera pose of ``view`` for points in the map frame (the scene frame shifted to ``centre_3``)."""
    T_world_map = np.eye(4)
    T_world_map[:3, 3] = centre_3
    return invert(view.T_world_cam) @ T_world_map


def view_correspondences(a: View, b: View, Ka: Intrinsics, Kb: Intrinsics, n: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Depth-checked matches in working-resolution pixels (views are rendered at that resolution)."""
    if (Ka.width, Ka.height) != (a.intrinsics.width, a.intrinsics.height):
        raise ValueError("pre-training views must be rendered at the model's working resolution")
    return correspondences(a, b, n, rng)


def save_views(scene: SceneViews, path) -> None:
    """Write a rendered scene to ``path`` (npz: uint8 images, float16 coords/depth, poses, intrinsics)."""
    from pathlib import Path

    path = Path(path)
    views = scene.mapping + scene.queries
    K = views[0].intrinsics
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, seed=scene.seed, n_mapping=len(scene.mapping), centre=scene.centre_3,
             images=np.stack([v.image for v in views]), poses=np.stack([v.T_world_cam for v in views]),
             depth=np.stack([v.depth for v in views]).astype(np.float16),
             coords=np.stack([v.meta["scene_coords"] for v in views]).astype(np.float16),
             K=np.array([K.fx, K.fy, K.cx, K.cy, K.width, K.height]))
    tmp.replace(path)  # readers never see a half-written scene


def load_views(path) -> SceneViews:
    # Each ``z[key]`` reads (and checksums) the whole array again: read every array once.
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in ("images", "poses", "depth", "coords", "K", "n_mapping", "seed", "centre")}
    fx, fy, cx, cy, w, h = a["K"]
    K = Intrinsics(float(fx), float(fy), float(cx), float(cy), int(w), int(h))
    views = [Frame(a["images"][i], K, a["poses"][i], float(i), a["depth"][i].astype(np.float32), f"view-{i}",
                   {"scene_coords": a["coords"][i].astype(np.float32)}) for i in range(len(a["images"]))]
    n = int(a["n_mapping"])
    return SceneViews(int(a["seed"]), views[:n], views[n:], a["centre"])


def render_bank(out_dir, first_seed: int, count: int, height: int = 240, mapping_frames: int = 32,
                query_frames: int = 12) -> None:
    """Render scenes ``first_seed .. first_seed+count-1`` into ``out_dir`` (skips existing ones).

    Run it beside pre-training (``--bank``) so rendering and training overlap. A seed whose
    layout has no camera path leaves a ``.skipped`` note with the reason, so that a later
    run over the same seeds does not try it again.
    """
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(first_seed, first_seed + count):
        path = out / f"scene-{seed:07d}.npz"
        skipped = path.with_suffix(".skipped")
        if path.exists() or skipped.exists():
            continue
        try:
            scene = SceneViews.generate(seed, height, mapping_frames, query_frames)
        except RuntimeError as e:  # a layout too cluttered for a camera path: skip the seed
            print(f"scene {seed} skipped: {e}", flush=True)
            skipped.write_text(f"{e}\n")
            continue
        save_views(scene, path)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Render a bank of pre-training scenes (one .npz per scene).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="bank folder")
    p.add_argument("--first-seed", type=int, default=0, help="first scene seed")
    p.add_argument("--count", type=int, default=100, help="number of scenes")
    p.add_argument("--mapping-frames", type=int, default=32, help="mapping views per scene")
    p.add_argument("--query-frames", type=int, default=12, help="query views per condition")
    a = p.parse_args()
    render_bank(a.out, a.first_seed, a.count, 240, a.mapping_frames, a.query_frames)
