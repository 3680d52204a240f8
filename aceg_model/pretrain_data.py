"""Views of generated scenes for pre-training (``aceg_model.scene`` does the rendering).

Each scene is rendered once when it enters the pool, at the model's working
resolution: a mapping sequence under the scene's light, and query sequences
under relit scenes and from off-path viewpoints, with the change drawn per
scene. Photometric changes are applied on the fly when a view is sampled:
mild ones on mapping views (augmentation), strong ones on query views
(``random_strong``: gain x0.08-3, gamma 0.4-2.5, coloured light, noise, blur).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from aceg_model.frames import Frame, Intrinsics
from aceg_model.scene import PRESETS, QuerySpec, SceneConfig, correspondences, generate_scene

View = Frame  # a rendered view: image, intrinsics, pose, depth, meta['scene_coords']


def scene_config(rng: np.random.Generator, height: int, mapping_frames: int, query_frames: int) -> SceneConfig:
    """A generator config with query conditions drawn at random for one scene."""
    width = height * 4 // 3
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

    @classmethod
    def generate(cls, seed: int, height: int, mapping_frames: int = 40, query_frames: int = 15) -> "SceneViews":
        cfg = scene_config(np.random.default_rng(seed + 12345), height, mapping_frames, query_frames)
        g = generate_scene(seed, cfg)
        queries = [f for frames in g.queries.values() for f in frames]
        centre = np.mean([f.T_world_cam[:3, 3] for f in g.mapping], axis=0)
        return cls(seed, g.mapping, queries, centre)

    def mapping_view(self, rng: np.random.Generator) -> View:
        view = self.mapping[rng.integers(len(self.mapping))]
        return view.with_image(PRESETS["random_mild"].apply(view.image, rng))

    def query_view(self, rng: np.random.Generator) -> View:
        view = self.queries[rng.integers(len(self.queries))]
        return view.with_image(PRESETS["random_strong"].apply(view.image, rng))


def view_correspondences(a: View, b: View, Ka: Intrinsics, Kb: Intrinsics, n: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Depth-checked matches in working-resolution pixels (views are rendered at that resolution)."""
    if (Ka.width, Ka.height) != (a.intrinsics.width, a.intrinsics.height):
        raise ValueError("pre-training views must be rendered at the model's working resolution")
    return correspondences(a, b, n, rng)
