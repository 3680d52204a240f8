"""Scenes with ground truth: a mapping sequence and query sequences under changed conditions.

``generate_scene(seed)`` builds a room or a street, textures it, plans a
camera path and renders posed `Frame`s with depth and scene coordinates. Each
source of randomness has its own generator spawned from the seed (layout,
textures, camera, trajectories, lighting, appearance), so the same seed gives
bit-identical scenes, and changing one query's parameters leaves the layout,
textures and mapping frames unchanged.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from aceg_model.frames import Frame, Intrinsics
from aceg_model.scene.appearance import AppearanceChange, AppearanceRange, appearance_preset
from aceg_model.scene.cache import load_scene, save_scene
from aceg_model.scene.layout import Layout, Light, Lighting, make_room, make_street
from aceg_model.scene.render import Scene, build_scene, render_view, texture_size
from aceg_model.scene.textures import list_photo_sources
from aceg_model.scene.trajectories import TrajectoryParams, plan_path, sample_trajectory


@dataclass(frozen=True)
class QuerySpec:
    """How a query sequence differs from the mapping sequence."""

    n_frames: int = 30
    appearance: str | AppearanceChange | AppearanceRange = "none"  # image-space change (preset name or object)
    light_gain: float = 1.0  # scales every light source and the ambient light
    light_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # colour of the new light
    light_move_m: float = 0.0  # point lights move this far (in a random horizontal direction)
    sun_move_deg: float = 0.0  # the sun's azimuth turns this much
    same_path: bool = True  # True: near the mapping path (a re-recording); False: a new path
    lateral_offset_m: float = 0.0  # sideways from the path
    height_offset_m: float = 0.0
    yaw_offset_deg: float = 0.0
    reverse: bool = False  # walk the path the other way


def default_queries() -> dict[str, QuerySpec]:
    return {
        # Same places, other light: lights dimmed, warmer and moved (cast shadows move with them),
        # then a darker exposure with light falloff towards the corners and low-light noise.
        "lighting": QuerySpec(
            appearance=AppearanceChange(gain=0.8, falloff=0.3, photons=500.0, read_noise=0.003),
            light_gain=0.6, light_tint=(1.15, 1.0, 0.8), light_move_m=1.5, sun_move_deg=60.0,
            lateral_offset_m=0.1),
        # Same light, other viewpoints: a new path, higher, turned and shifted sideways.
        "viewpoint": QuerySpec(same_path=False, lateral_offset_m=0.3, height_offset_m=0.3, yaw_offset_deg=25.0),
    }


@dataclass(frozen=True)
class SceneConfig:
    """What `generate_scene` makes. Defaults: a 640x480 camera with f in 500-600 px (like
    7-Scenes' 525 px), 120 mapping frames scanning the whole path and two 30-frame query sequences."""

    kind: str = "mixed"  # "room", "street" or "mixed"
    p_room: float = 0.7  # chance of a room when mixed (the evaluation scene is indoors)
    style: str = "random"  # camera motion: "handheld", "wheeled" or "random" (handheld 70 %)
    width: int = 640
    height: int = 480
    focal_range_px: tuple[float, float] = (500.0, 600.0)
    mapping_frames: int = 120  # over a 7-17 m room loop: 0.06-0.15 m and < 10 deg between frames
    # Path length between frames. None: mapping frames spread once over the whole path (a scan of
    # the scene, so queries anywhere on it see mapped surfaces); queries 0.08 m (rooms) / 0.5 m (streets).
    step_m: float | None = None
    queries: dict[str, QuerySpec] = field(default_factory=default_queries)
    px_per_m: float | None = None  # texel density; None: 200 in rooms, 64 on streets (~1-2 texels per pixel)
    max_texels: int = 12_000_000  # per scene incl. mips (~48 MB); density shrinks to fit
    shadows: bool = True  # cast shadows from the main light (about 1.3x slower to render)
    use_shared_data: bool = True  # also texture with Strecha/KITTI photos from ../shared/data when present
    fps: float = 10.0  # frame rate of the stamps; each sequence starts SEQUENCE_GAP_S after the previous
    cache_dir: Path | None = None  # where built scenes (geometry + textures) are kept between runs

    def __post_init__(self) -> None:
        if self.kind not in ("room", "street", "mixed"):
            raise ValueError(f"SceneConfig.kind must be 'room', 'street' or 'mixed', got {self.kind!r}")
        if self.style not in ("handheld", "wheeled", "random"):
            raise ValueError(f"SceneConfig.style must be 'handheld', 'wheeled' or 'random', got {self.style!r}")


@dataclass
class GeneratedScene:
    seed: int
    config: SceneConfig
    scene: Scene
    intrinsics: Intrinsics
    style: str
    mapping: list[Frame]
    queries: dict[str, list[Frame]]


def _rngs(seed: int) -> dict[str, np.random.Generator]:
    names = ("layout", "textures", "camera", "trajectory", "lighting", "appearance")
    return {n: np.random.default_rng(s) for n, s in zip(names, np.random.SeedSequence(seed).spawn(len(names)))}


SEQUENCE_GAP_S = 60.0  # between the end of one sequence and the start of the next
GENERATOR_VERSION = 1  # bump when layouts or textures change, so cached scenes are rebuilt


def _scene_key(seed: int, config: SceneConfig, photos: list[str]) -> str:
    spec = [GENERATOR_VERSION, seed, config.kind, config.p_room, config.px_per_m, config.max_texels, photos]
    return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:16]


def make_scene(seed: int, config: SceneConfig | None = None) -> Scene:
    """The geometry and textures of scene ``seed`` (from the cache when there)."""
    config = config or SceneConfig()
    photos = list_photo_sources(use_shared=config.use_shared_data)
    path = None
    if config.cache_dir is not None:
        path = Path(config.cache_dir) / f"scene-{seed}-{_scene_key(seed, config, photos)}.npz"
        if path.exists():
            return load_scene(path)
    rngs = _rngs(seed)
    rng = rngs["layout"]
    room = config.kind == "room" or (config.kind == "mixed" and rng.random() < config.p_room)
    density = config.px_per_m or (200.0 if room else 64.0)
    layout = make_room(rng, density) if room else make_street(rng, density)
    _fit_texel_budget(layout, config.max_texels)
    scene = build_scene(layout, rngs["textures"], photos)
    if path is not None:
        save_scene(scene, path)
    return scene


def _fit_texel_budget(layout: Layout, max_texels: int) -> None:
    """Scale texel densities down so all textures with mips fit in ``max_texels``."""
    q = layout.quads
    for _ in range(20):
        total = sum(np.prod(texture_size(q.size_Q2[i], q.px_per_m_Q[i])) for i in range(len(q))) * 4 / 3
        if total <= max_texels:
            return
        q.px_per_m_Q *= max(0.5, np.sqrt(max_texels / total) * 0.98)


def relight(lighting: Lighting, spec: QuerySpec, rng: np.random.Generator,
            region: tuple[float, float, float, float] | None = None) -> Lighting:
    """The scene's lighting changed as ``spec`` says; moved point lights stay inside ``region``
    (x_min, y_min, x_max, y_max), e.g. the room, so no light ends up behind a wall."""
    scale = spec.light_gain * np.asarray(spec.light_tint)
    lights = []
    for light in lighting.lights:
        pos = np.asarray(light.position, float)
        if light.directional:
            a = np.radians(spec.sun_move_deg) * rng.choice([-1.0, 1.0])
            c, s = np.cos(a), np.sin(a)
            pos = np.array([c * pos[0] - s * pos[1], s * pos[0] + c * pos[1], pos[2]])
        else:
            angle = rng.uniform(0, 2 * np.pi)
            pos = pos + spec.light_move_m * np.array([np.cos(angle), np.sin(angle), 0.0])
            if region is not None:
                pos[:2] = np.clip(pos[:2], np.add(region[:2], 0.2), np.subtract(region[2:], 0.2))
        lights.append(replace(light, position=tuple(pos), rgb=tuple(np.asarray(light.rgb) * scale)))
    return Lighting(tuple(np.asarray(lighting.ambient_rgb) * scale), lights, lighting.sky_rgb)


def generate_scene(seed: int, config: SceneConfig | None = None,
                   progress: Callable[[Frame], None] | None = None) -> GeneratedScene:
    """Scene ``seed``: a mapping sequence and one query sequence per ``config.queries`` entry.

    Frames carry depth (float32 m, 0 where nothing is hit),
    ``meta['scene_coords']`` (HxWx3 float32 world points, NaN where nothing is
    hit), ``meta['surface_ids']`` (HxW int32, -1) and ``meta['condition']``.
    ``progress`` is called with each frame once it is rendered.
    """
    config = config or SceneConfig()
    rngs = _rngs(seed)
    scene = make_scene(seed, config)
    layout = scene.layout
    rng = rngs["camera"]
    intrinsics = Intrinsics.centred(float(rng.uniform(*config.focal_range_px)), config.width, config.height)
    style = config.style if config.style != "random" else ("handheld" if rng.random() < 0.7 else "wheeled")
    height = (rng.uniform(1.1, 1.7) if layout.kind == "room" else rng.uniform(1.4, 1.8)) if style == "handheld" \
        else rng.uniform(0.25, 0.6)
    base = TrajectoryParams(style=style, step_m=config.step_m, height_m=height)

    rng_traj = rngs["trajectory"]
    path = plan_path(layout, rng_traj)
    mapping_poses = sample_trajectory(layout, path, rng_traj, config.mapping_frames,
                                      replace(base, cover_path=config.step_m is None))
    mapping = _render_sequence(scene, mapping_poses, intrinsics, scene.lighting, AppearanceChange(), rngs,
                               config, "mapping", 0.0, progress)
    queries = {}
    for name, spec in config.queries.items():
        q_path = path if spec.same_path else plan_path(layout, rng_traj)
        params = replace(base, lateral_offset_m=spec.lateral_offset_m, height_offset_m=spec.height_offset_m,
                         yaw_offset_deg=spec.yaw_offset_deg, reverse=spec.reverse)
        poses = sample_trajectory(layout, q_path, rng_traj, spec.n_frames, params)
        lighting = relight(scene.lighting, spec, rngs["lighting"], layout.walk_region)
        appearance = appearance_preset(spec.appearance) if isinstance(spec.appearance, str) else spec.appearance
        # Each sequence is recorded later than the one before (stamps never repeat within a scene).
        start_s = max(f.stamp for seq in [mapping, *queries.values()] for f in seq) + SEQUENCE_GAP_S
        queries[name] = _render_sequence(scene, poses, intrinsics, lighting, appearance, rngs, config, name,
                                         start_s, progress)
    return GeneratedScene(seed, config, scene, intrinsics, style, mapping, queries)


def _render_sequence(scene, poses, intrinsics, lighting, appearance, rngs, config, condition, start_s,
                     progress=None) -> list[Frame]:
    frames = []
    rng = rngs["appearance"]
    for i, T in enumerate(poses):
        name = f"{condition}-{i:04d}"
        frame = render_view(scene, T, intrinsics, lighting, config.shadows, name, start_s + i / config.fps)
        change = appearance.sample(rng) if isinstance(appearance, AppearanceRange) else appearance
        if change != AppearanceChange():
            frame = frame.with_image(change.apply(frame.image, rng))
        frame.meta.update(condition=condition, appearance=asdict(change))
        frames.append(frame)
        if progress is not None:
            progress(frame)
    return frames
