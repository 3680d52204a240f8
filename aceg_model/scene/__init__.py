"""Procedural scenes with ground truth for pre-training and demos (no ROS imports).

- `generate_scene(seed, config)`: a room or street, a mapping sequence and query
  sequences under changed lighting/viewpoints, as `Frame`s with depth and
  ``meta['scene_coords']``.
- `render_view(scene, T_world_cam, intrinsics)`: any other view, on the fly.
- `AppearanceChange` / `AppearanceRange` / `appearance_preset(name)`: photometric changes.
- `correspondences(frame_a, frame_b, n, rng)`: depth-checked pixel matches.
- `save_scene` / `load_scene`: scenes cached on disk.
"""
from aceg_model.scene.appearance import PRESETS, AppearanceChange, AppearanceRange, appearance_preset
from aceg_model.scene.cache import load_scene, save_scene
from aceg_model.scene.correspondences import correspondences, project, scene_coords
from aceg_model.scene.generate import (GeneratedScene, QuerySpec, SceneConfig, default_queries, generate_scene,
                                       make_scene, relight)
from aceg_model.scene.render import Render, Scene, render_tensors, render_view
from aceg_model.scene.trajectories import TrajectoryParams, camera_pose, plan_path, sample_trajectory

__all__ = [
    "PRESETS", "AppearanceChange", "AppearanceRange", "appearance_preset", "load_scene", "save_scene",
    "correspondences", "project", "scene_coords", "GeneratedScene", "QuerySpec", "SceneConfig",
    "default_queries", "generate_scene", "make_scene", "relight", "Render", "Scene", "render_tensors",
    "render_view", "TrajectoryParams", "camera_pose", "plan_path", "sample_trajectory",
]
