"""Scenes on disk: one ``.npz`` (no pickle) with the layout, lighting and textures
(uint8 RGB texels, 3 bytes each: a 12 M-texel scene is 36 MB).

Building textures is the slow part of making a scene (1-3 s); a cached scene
loads in well under a second, so pre-training can keep many scenes on disk.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from aceg_model.scene.layout import Layout, Light, Lighting, Quads
from aceg_model.scene.render import Scene, pack_rgb

FORMAT_VERSION = 1
_TENSORS = ("origin_Q3", "axis_u_Q3", "axis_v_Q3", "normal_Q3", "size_Q2", "px_per_m_Q", "casts_shadow_Q",
            "tex_packed_N", "tex_base_QL", "tex_w_QL", "tex_h_QL")


def save_scene(scene: Scene, path: Path) -> None:
    """Write ``scene`` to ``path`` atomically (a temporary file, then a rename)."""
    lay, q = scene.layout, scene.layout.quads
    arrays = {f"t_{n}": getattr(scene, n).numpy() for n in _TENSORS if n != "tex_packed_N"}
    packed = scene.tex_packed_N.numpy()
    arrays["texels_N3"] = np.stack([packed & 255, (packed >> 8) & 255, (packed >> 16) & 255], 1).astype(np.uint8)
    arrays.update({f"q_{f.name}": np.asarray(getattr(q, f.name)) for f in fields(Quads)})
    arrays.update(free_dist_m=lay.free_dist_m, grid_origin_xy=lay.grid_origin_xy, centre_xy=lay.centre_xy)
    header = dict(version=FORMAT_VERSION, kind=lay.kind, camera_z_range=list(lay.camera_z_range),
                  walk_region=list(lay.walk_region), lighting=asdict(lay.lighting))
    arrays["header"] = np.array(json.dumps(header))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_scene(path: Path) -> Scene:
    """Read a scene written by `save_scene`."""
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: scene cache version {header.get('version')}, expected {FORMAT_VERSION}")
        quad_args = {f.name: data[f"q_{f.name}"] for f in fields(Quads)}
        quad_args["material"] = [str(m) for m in quad_args["material"]]
        light = header["lighting"]
        lighting = Lighting(tuple(light["ambient_rgb"]), [Light(**{k: tuple(v) if isinstance(v, list) else v
                                                                    for k, v in li.items()}) for li in light["lights"]],
                            tuple(light["sky_rgb"]) if light["sky_rgb"] is not None else None)
        layout = Layout(header["kind"], Quads(**quad_args), lighting, data["free_dist_m"], data["grid_origin_xy"],
                        data["centre_xy"], tuple(header["camera_z_range"]), tuple(header["walk_region"]))
        tensors = {n: torch.from_numpy(data[f"t_{n}"].copy()) for n in _TENSORS if n != "tex_packed_N"}
        tensors["tex_packed_N"] = torch.from_numpy(pack_rgb(data["texels_N3"]))
    return Scene(layout, **tensors)
