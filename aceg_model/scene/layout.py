"""Scene geometry: indoor rooms with furniture-like boxes, outdoor streets of facades.

World frame: z up, metres, floor (ground) at z = 0. Every surface is a
rectangle ("quad") with a corner ``origin``, unit edge axes ``u`` and ``v`` and
a size in metres; its normal ``u x v`` points to the side it is seen from
(into the room for walls, out of solids for boxes). Vertical quads have ``v``
pointing down, so textures stand upright.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

UP = np.array([0.0, 0.0, 1.0])
GRID_RES_M = 0.05  # occupancy grid cell for trajectory planning


@dataclass
class Quads:
    """A set of Q textured rectangles (numpy, float64)."""

    origin_Q3: np.ndarray
    axis_u_Q3: np.ndarray
    axis_v_Q3: np.ndarray
    size_Q2: np.ndarray
    px_per_m_Q: np.ndarray  # texel density; low on faces that are never seen up close
    material: list[str]
    decals_Q: np.ndarray  # number of pasted pictures
    object_Q: np.ndarray  # which object (wall set, box) the quad belongs to
    casts_shadow_Q: np.ndarray  # False for the room shell and the ground: they bound the scene, never occlude

    @property
    def normal_Q3(self) -> np.ndarray:
        return np.cross(self.axis_u_Q3, self.axis_v_Q3)

    def __len__(self) -> int:
        return len(self.origin_Q3)


class QuadBuilder:
    """Collects quads one by one, then freezes them into `Quads`."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.n_objects = 0

    def add(self, centre, normal, down, su, sv, px_per_m, material, decals=0, obj=None, casts_shadow=True) -> None:
        """A quad of ``su`` x ``sv`` metres centred at ``centre``, seen from ``normal``'s side."""
        n, v = np.asarray(normal, float), np.asarray(down, float)
        u = np.cross(v, n)  # so that u x v = n
        origin = np.asarray(centre, float) - 0.5 * su * u - 0.5 * sv * v
        obj = self.n_objects if obj is None else obj
        self.rows.append((origin, u, v, (su, sv), px_per_m, material, decals, obj, casts_shadow))

    def add_box(self, centre, half_xyz, yaw, px_per_m, materials, hidden_bottom=True) -> int:
        """The six outward faces of a box rotated by ``yaw`` about z; returns its object id."""
        c, s = np.cos(yaw), np.sin(yaw)
        ex, ey = np.array([c, s, 0.0]), np.array([-s, c, 0.0])
        hx, hy, hz = half_xyz
        centre = np.asarray(centre, float)
        obj = self.n_objects
        for i, (n, h_n, su) in enumerate(((ex, hx, 2 * hy), (-ex, hx, 2 * hy), (ey, hy, 2 * hx), (-ey, hy, 2 * hx))):
            self.add(centre + h_n * n, n, -UP, su, 2 * hz, px_per_m, materials[i % len(materials)], obj=obj)
        self.add(centre + hz * UP, UP, ey, 2 * hx, 2 * hy, px_per_m, materials[-1], obj=obj)
        # The bottom is only seen from below the floor; keep it tiny in texels.
        self.add(centre - hz * UP, -UP, ey, 2 * hx, 2 * hy, 2.0 if hidden_bottom else px_per_m, "noise", obj=obj)
        self.n_objects += 1
        return obj

    def build(self) -> Quads:
        o, u, v, size, ppm, mat, dec, obj, shadow = zip(*self.rows)
        return Quads(np.array(o), np.array(u), np.array(v), np.array(size, float), np.array(ppm, float),
                     list(mat), np.array(dec, int), np.array(obj, int), np.array(shadow, bool))


@dataclass
class Light:
    """A point light (``position``) or, when ``directional``, a sun shining along ``position``."""

    position: tuple[float, float, float]
    rgb: tuple[float, float, float]  # irradiance scale per channel at the reference distance
    falloff_m: float = 3.0  # distance at which a point light's irradiance has halved
    directional: bool = False
    shadows: bool = True


@dataclass
class Lighting:
    ambient_rgb: tuple[float, float, float]
    lights: list[Light] = field(default_factory=list)
    sky_rgb: tuple[float, float, float] | None = None  # background where no surface is hit


@dataclass
class Layout:
    """Geometry, base lighting and the free space cameras may move in."""

    kind: str  # "room" or "street"
    quads: Quads
    lighting: Lighting
    free_dist_m: np.ndarray  # HxW grid: distance to the nearest obstacle footprint or wall, metres
    grid_origin_xy: np.ndarray  # world xy of grid cell (0, 0)
    centre_xy: np.ndarray
    camera_z_range: tuple[float, float]  # heights cameras may take
    walk_region: tuple[float, float, float, float]  # (x_min, y_min, x_max, y_max) where camera paths go

    def clearance(self, xy_N2: np.ndarray) -> np.ndarray:
        """Distance (metres) from each xy point to the nearest obstacle; 0 outside the grid."""
        ij = np.round((np.asarray(xy_N2) - self.grid_origin_xy) / GRID_RES_M).astype(int)
        h, w = self.free_dist_m.shape
        inside = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
        out = np.zeros(len(ij))
        out[inside] = self.free_dist_m[ij[inside, 1], ij[inside, 0]]
        return out


def footprint_xy(centre, half_xy, yaw) -> np.ndarray:
    """4x2 corners of a box footprint."""
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, -s], [s, c]])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * np.asarray(half_xy)
    return corners @ R.T + np.asarray(centre)[:2]


class Occupancy:
    """A 2D grid of blocked cells used to place objects and plan camera paths."""

    def __init__(self, xy_min, xy_max, margin_m=1.0):
        self.origin = np.asarray(xy_min, float) - margin_m
        size = np.ceil((np.asarray(xy_max) - self.origin + margin_m) / GRID_RES_M).astype(int)
        self.grid = np.ones((size[1], size[0]), np.uint8)  # 1 free, 0 blocked

    def _px(self, xy):
        return np.round((np.asarray(xy) - self.origin) / GRID_RES_M).astype(np.int32)

    def block_polygon(self, corners_N2) -> None:
        cv2.fillConvexPoly(self.grid, self._px(corners_N2), 0)

    def free_rect(self, xy_min, xy_max) -> None:
        a, b = self._px(xy_min), self._px(xy_max)
        self.grid[a[1] : b[1], a[0] : b[0]] = 1

    def is_free(self, corners_N2, pad_m=0.0) -> bool:
        mask = np.zeros_like(self.grid)
        cv2.fillConvexPoly(mask, self._px(corners_N2), 1)
        if pad_m > 0:
            k = 2 * int(pad_m / GRID_RES_M) + 1
            mask = cv2.dilate(mask, np.ones((k, k), np.uint8))
        return not np.any(mask.astype(bool) & (self.grid == 0))

    def distance_m(self) -> np.ndarray:
        return cv2.distanceTransform(self.grid, cv2.DIST_L2, 5) * GRID_RES_M


# ---------------------------------------------------------------------------
# Rooms


def _wall_material(rng):
    return rng.choice(["mosaic", "photo", "tiles", "noise"], p=[0.35, 0.25, 0.2, 0.2])


def make_room(rng: np.random.Generator, px_per_m: float = 200.0) -> Layout:
    """A box-shaped room with furniture: cabinets and shelves against the walls, tables,
    low boxes and columns, lit by ceiling lights."""
    W, D, H = rng.uniform(4.0, 8.0), rng.uniform(3.5, 7.0), rng.uniform(2.4, 3.2)
    qb = QuadBuilder()
    occ = Occupancy((0.0, 0.0), (W, D))
    occ.grid[:] = 0
    occ.free_rect((0.0, 0.0), (W, D))

    # Walls, floor and ceiling, seen from inside.
    walls = (((W / 2, 0, H / 2), (0, 1, 0), W), ((W / 2, D, H / 2), (0, -1, 0), W),
             ((0, D / 2, H / 2), (1, 0, 0), D), ((W, D / 2, H / 2), (-1, 0, 0), D))
    for centre, normal, length in walls:
        qb.add(centre, normal, -UP, length, H, px_per_m, _wall_material(rng), decals=int(rng.integers(0, 4)),
               casts_shadow=False)
    qb.add((W / 2, D / 2, 0), UP, (0, -1, 0), W, D, px_per_m, rng.choice(["tiles", "photo", "noise", "mosaic"]),
           casts_shadow=False)
    qb.add((W / 2, D / 2, H), -UP, (0, 1, 0), W, D, px_per_m * 0.5, rng.choice(["noise", "tiles", "photo"]),
           casts_shadow=False)
    qb.n_objects = 1

    def place(centre, half, yaw, pad=0.05) -> bool:
        fp = footprint_xy(centre, half[:2], yaw)
        if not occ.is_free(fp, pad):
            return False
        occ.block_polygon(fp)
        return True

    def box_materials():
        return [rng.choice(["photo", "noise", "tiles", "mosaic"], p=[0.4, 0.25, 0.2, 0.15]) for _ in range(5)]

    n_items, placed = int(rng.integers(4, 10)), 0
    for _ in range(n_items * 4):  # attempts
        if placed >= n_items:
            break
        kind = rng.choice(["cabinet", "table", "low", "column", "stack"], p=[0.35, 0.2, 0.2, 0.1, 0.15])
        if kind in ("cabinet", "stack", "column"):
            # Against a random wall, aligned with it.
            wall = rng.integers(4)
            w, d = rng.uniform(0.4, 2.0), rng.uniform(0.3, 0.7)
            h = rng.uniform(0.4, H - 0.3) if kind != "column" else H
            if kind == "column":
                w = d = rng.uniform(0.25, 0.6)
            along = rng.uniform(w / 2 + 0.05, (W if wall < 2 else D) - w / 2 - 0.05)
            gap = 0.01
            xy = {0: (along, d / 2 + gap), 1: (along, D - d / 2 - gap),
                  2: (d / 2 + gap, along), 3: (W - d / 2 - gap, along)}[wall]
            yaw = 0.0 if wall < 2 else np.pi / 2
            half = np.array([w / 2, d / 2, h / 2])
            if not place(xy, half, yaw):
                continue
            placed += 1
            qb.add_box((*xy, h / 2), half, yaw, px_per_m, box_materials())
            if kind == "stack" and h < 1.4:  # a second, smaller box on top
                h2 = rng.uniform(0.2, 0.6)
                half2 = np.array([w / 2 * rng.uniform(0.4, 0.9), d / 2 * rng.uniform(0.5, 0.9), h2 / 2])
                qb.add_box((*xy, h + h2 / 2), half2, yaw + rng.normal(0, 0.2), px_per_m, box_materials())
        else:
            # Free-standing: keep away from the walls so the camera can pass around.
            w, d = rng.uniform(0.6, 1.8), rng.uniform(0.5, 1.2)
            xy = (rng.uniform(0.8, W - 0.8), rng.uniform(0.8, D - 0.8))
            yaw = rng.uniform(0, np.pi)
            h = rng.uniform(0.7, 0.8) if kind == "table" else rng.uniform(0.3, 0.9)
            half = np.array([w / 2, d / 2, h / 2])
            if not place(xy, half, yaw, pad=0.9):  # leave a corridor around free-standing items
                continue
            placed += 1
            if kind == "table":
                top, leg = 0.04, 0.03
                qb.add_box((*xy, h - top / 2), (w / 2, d / 2, top / 2), yaw, px_per_m, box_materials(),
                           hidden_bottom=False)
                for c in footprint_xy(xy, (w / 2 - 2 * leg, d / 2 - 2 * leg), yaw):
                    qb.add_box((*c, (h - top) / 2), (leg, leg, (h - top) / 2), yaw, px_per_m * 0.5, box_materials())
            else:
                qb.add_box((*xy, h / 2), half, yaw, px_per_m, box_materials())

    # Ceiling lights: warm or cool white, one to three of them.
    lights = []
    for _ in range(int(rng.integers(1, 4))):
        temp = rng.uniform(-1, 1)
        rgb = np.array([1.0 + 0.12 * temp, 1.0, 1.0 - 0.15 * temp]) * rng.uniform(0.9, 1.3)
        pos = (rng.uniform(0.5, W - 0.5), rng.uniform(0.5, D - 0.5), H - 0.25)
        lights.append(Light(pos, tuple(rgb), falloff_m=rng.uniform(2.5, 4.5), shadows=len(lights) == 0))
    for light in lights:  # several lights share the brightness budget
        light.rgb = tuple(np.asarray(light.rgb) / np.sqrt(len(lights)))
    ambient = tuple(np.full(3, rng.uniform(0.5, 0.65)))
    return Layout("room", qb.build(), Lighting(ambient, lights), occ.distance_m(), occ.origin,
                  np.array([W / 2, D / 2]), (0.3, H - 0.5), (0.0, 0.0, W, D))


# ---------------------------------------------------------------------------
# Streets


def make_street(rng: np.random.Generator, px_per_m: float = 64.0) -> Layout:
    """A straight street along +x lined with buildings whose fronts are facades with windows,
    a few kiosk/car-sized boxes on the pavement, under a sun and an open sky."""
    L, half_w = rng.uniform(30.0, 60.0), rng.uniform(4.0, 9.0)
    qb = QuadBuilder()
    occ = Occupancy((-5.0, -half_w - 3.0), (L + 5.0, half_w + 3.0))
    hidden = 3.0  # px/m for faces no street camera sees (roofs, backs)
    for side in (-1, 1):
        x, gap_before = -rng.uniform(2.0, 6.0), True
        while x < L + 4.0:
            bw, bd, bh = rng.uniform(6.0, 16.0), rng.uniform(8.0, 14.0), rng.uniform(6.0, 22.0)
            gap_after = rng.uniform(1.0, 4.0) if rng.random() < 0.35 else 0.0
            setback = rng.uniform(0.0, 1.5)
            cy = side * (half_w + setback + bd / 2)
            centre = np.array([x + bw / 2, cy, bh / 2])
            obj = qb.n_objects
            # The front (facing the street) is a facade; sides are plain walls, seen only across a gap.
            front_n = np.array([0.0, -side, 0.0])
            qb.add(centre + front_n * bd / 2, front_n, -UP, bw, bh, px_per_m, "facade", obj=obj)
            qb.add(centre - front_n * bd / 2, -front_n, -UP, bw, bh, hidden, "noise", obj=obj)
            for sx, seen in ((-1, gap_before), (1, gap_after > 0 or x + bw >= L + 4.0)):
                qb.add(centre + np.array([sx * bw / 2, 0, 0]), (sx, 0, 0), -UP, bd, bh,
                       px_per_m * 0.5 if seen else hidden, rng.choice(["noise", "tiles", "photo"]), obj=obj)
            qb.add(centre + UP * bh / 2, UP, (0, 1, 0), bw, bd, hidden, "noise", obj=obj)
            qb.n_objects += 1
            occ.block_polygon(footprint_xy(centre, (bw / 2, bd / 2 + setback), 0.0))
            x, gap_before = x + bw + gap_after, gap_after > 0
    # Ground: a paved street, seen at grazing angles, with its own texels.
    ground_len, ground_w = L + 20.0, 2 * half_w + 6.0
    qb.add((L / 2, 0.0, 0.0), UP, (0, -1, 0), ground_len, ground_w, px_per_m * 0.6,
           rng.choice(["tiles", "noise"]), obj=qb.n_objects, casts_shadow=False)  # a photo would stretch 70 m
    qb.n_objects += 1
    # Street furniture: kiosks, parked vans, bins near the pavement edge.
    for _ in range(int(rng.integers(3, 9))):
        side = rng.choice([-1, 1])
        w, d, h = rng.uniform(0.6, 4.5), rng.uniform(0.6, 2.0), rng.uniform(0.6, 2.5)
        xy = (rng.uniform(0, L), side * (half_w - d / 2 - rng.uniform(0.2, 1.0)))
        fp = footprint_xy(xy, (w / 2, d / 2), 0.0)
        if occ.is_free(fp, 0.3):
            occ.block_polygon(fp)
            qb.add_box((*xy, h / 2), (w / 2, d / 2, h / 2), 0.0, px_per_m * 1.5,
                       [rng.choice(["photo", "noise", "mosaic"]) for _ in range(5)])
    # Close off the far ends with grid-blocking so paths stay on the street.
    occ.block_polygon(np.array([[-5.0, -half_w - 3], [0.0, -half_w - 3], [0.0, half_w + 3], [-5.0, half_w + 3]]))
    occ.block_polygon(np.array([[L, -half_w - 3], [L + 5, -half_w - 3], [L + 5, half_w + 3], [L, half_w + 3]]))

    elev, azim = np.radians(rng.uniform(20, 65)), rng.uniform(0, 2 * np.pi)
    sun_dir = -np.array([np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev)])
    sun = Light(tuple(sun_dir), tuple(np.array([1.0, 0.97, 0.9]) * rng.uniform(0.6, 0.9)), directional=True)
    ambient = tuple(np.array([0.92, 0.97, 1.05]) * rng.uniform(0.55, 0.7))
    sky = tuple(np.array([0.55, 0.7, 0.95]) * rng.uniform(0.8, 1.1))
    return Layout("street", qb.build(), Lighting(ambient, [sun], sky_rgb=sky), occ.distance_m(), occ.origin,
                  np.array([L / 2, 0.0]), (0.25, 2.0), (0.0, -half_w, L, half_w))
