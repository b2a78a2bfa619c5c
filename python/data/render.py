"""A CLEVR-look renderer in numpy: analytic ray casting of cubes, spheres and cylinders on a plane.

Primary rays hit rounded cubes, spheres and cylinders (exact intersections; rounded edges come from
the rounded-box normal evaluated on the hit point), the ground plane fades into a gray horizon,
a key light casts soft shadows (a few samples on an area light), fill and back lights add form,
metal objects reflect the environment and carry sharp highlights. Everything is vectorised over
pixels, so one 160x120 image costs a few milliseconds of array work.

A scene is sampled from a seed alone (`sample_scene`), so any image can be re-rendered exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from python.core.labels import COLORS, OBJECTS, SHAPES

# CLEVR's published palette (sRGB 0-255), in labels.COLORS order.
PALETTE = np.array(
    [(87, 87, 87), (173, 35, 35), (42, 75, 215), (29, 105, 20),
     (129, 74, 25), (129, 38, 192), (41, 208, 208), (255, 238, 51)], np.float32) / 255.0
SIZES = (0.35, 0.7)  # small, large (half-extent in scene units)
MATERIALS = ("rubber", "metal")
PLACEMENT = 3.0  # objects are centred in [-PLACEMENT, PLACEMENT]^2 (then checked to be in view)
EPS = 1e-4


@dataclass(frozen=True)
class Obj:
    shape: int  # index into SHAPES
    color: int  # index into COLORS
    size: float
    metal: bool
    x: float
    y: float
    theta: float  # rotation about the vertical axis

    @property
    def label(self) -> str:
        return f"{COLORS[self.color]} {SHAPES[self.shape]}"

    @property
    def half(self) -> float:
        """Half-height; CLEVR shrinks cubes by sqrt(2) so that a rotated cube fits its footprint."""
        return self.size / np.sqrt(2) if SHAPES[self.shape] == "cube" else self.size

    @property
    def footprint(self) -> float:
        """Radius of a vertical cylinder that contains the object."""
        return self.half * np.sqrt(2) if SHAPES[self.shape] == "cube" else self.size


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    cam_pos: tuple[float, float, float]
    key_light: tuple[float, float, float]
    fill_light: tuple[float, float, float]
    back_light: tuple[float, float, float]
    fov: float = np.deg2rad(42.0)  # horizontal field of view
    target: tuple[float, float, float] = field(default=(0.0, 0.4, 0.0))

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.objects]


def _normalize(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _camera_basis(scene: Scene):
    c = np.array(scene.cam_pos, np.float64)
    f = _normalize(np.array(scene.target) - c)
    r = _normalize(np.cross(f, [0.0, 0.0, 1.0]))
    u = np.cross(r, f)
    return c, f, r, u


def camera_rays(scene: Scene, width: int, height: int):
    """Ray origin (3,) and unit directions (H*W, 3) through pixel centres."""
    c, f, r, u = _camera_basis(scene)
    tx = np.tan(scene.fov / 2)
    xs = ((np.arange(width) + 0.5) / width * 2 - 1) * tx
    ys = ((np.arange(height) + 0.5) / height * 2 - 1) * tx * height / width
    d = f[None, None] + xs[None, :, None] * r[None, None] - ys[:, None, None] * u[None, None]
    return c, _normalize(d.reshape(-1, 3))


def project(scene: Scene, points, width: int, height: int):
    """World points (N, 3) -> pixel coordinates (N, 2) and depth along the view axis."""
    c, f, r, u = _camera_basis(scene)
    p = np.asarray(points, np.float64) - c
    z = p @ f
    tx = np.tan(scene.fov / 2)
    px = (p @ r / z / tx + 1) / 2 * width
    py = (1 - p @ u / z / (tx * height / width)) / 2 * height
    return np.stack([px, py], -1), z


def _to_local(o: Obj, origins, dirs):
    """Translate to the object's base centre and undo its rotation (vertical axis)."""
    cs, sn = np.cos(-o.theta), np.sin(-o.theta)
    rot = np.array([[cs, -sn, 0], [sn, cs, 0], [0, 0, 1]])
    return (origins - np.array([o.x, o.y, 0.0])) @ rot.T, dirs @ rot.T


def intersect(o: Obj, origins, dirs):
    """Distance to the first hit along each ray (inf where it misses).

    Rays are first culled against the object's bounding sphere (a few cheap array ops), and the exact
    test runs on the survivors only: most shadow and camera rays pass far from any given object."""
    t = np.full(len(dirs), np.inf)
    near = _near(o, origins, dirs)
    if len(near):
        t[near] = _intersect_exact(o, origins[near], dirs[near])
    return t


def _near(o: Obj, origins, dirs, pad: float = 0.0):
    """Indices of the rays that pass within the object's bounding sphere (grown by `pad`)."""
    oc = origins - np.array([o.x, o.y, o.half])
    b = np.einsum("ij,ij->i", oc, dirs)
    disc = b * b - (np.einsum("ij,ij->i", oc, oc) - (np.hypot(o.footprint, o.half) + pad) ** 2)
    return np.flatnonzero((disc > 0) & (b < np.sqrt(np.maximum(disc, 0))))


def _intersect_exact(o: Obj, origins, dirs):
    lo, ld = _to_local(o, origins, dirs)
    t = np.full(len(ld), np.inf)
    shape = SHAPES[o.shape]
    with np.errstate(divide="ignore", invalid="ignore"):
        if shape == "sphere":
            oc = lo - np.array([0, 0, o.size])
            b = np.einsum("ij,ij->i", oc, ld)
            disc = b * b - (np.einsum("ij,ij->i", oc, oc) - o.size**2)
            t0 = -b - np.sqrt(disc)
            ok = (disc > 0) & (t0 > EPS)
            t[ok] = t0[ok]
        elif shape == "cylinder":
            a = ld[:, 0] ** 2 + ld[:, 1] ** 2
            b = lo[:, 0] * ld[:, 0] + lo[:, 1] * ld[:, 1]
            c = lo[:, 0] ** 2 + lo[:, 1] ** 2 - o.size**2
            disc = b * b - a * c
            t0 = (-b - np.sqrt(disc)) / a
            z0 = lo[:, 2] + t0 * ld[:, 2]
            ok = (disc > 0) & (t0 > EPS) & (z0 >= 0) & (z0 <= 2 * o.size)
            t[ok] = t0[ok]
            tc = (2 * o.size - lo[:, 2]) / ld[:, 2]
            pc = lo[:, :2] + tc[:, None] * ld[:, :2]
            ok = (tc > EPS) & (np.einsum("ij,ij->i", pc, pc) <= o.size**2) & (tc < t)
            t[ok] = tc[ok]
        else:  # cube: slab test against the box [-h, h]^2 x [0, 2h]
            h = o.half
            lo = lo - np.array([0, 0, h])
            t1, t2 = (-h - lo) / ld, (h - lo) / ld
            tn = np.nanmax(np.minimum(t1, t2), axis=1)
            tf = np.nanmin(np.maximum(t1, t2), axis=1)
            ok = (tn <= tf) & (tn > EPS)
            t[ok] = tn[ok]
    return t


def normal(o: Obj, points):
    """Outward unit normals at surface points; edges rounded (rounded-box / rounded-cylinder normal)."""
    lp, _ = _to_local(o, points, np.zeros_like(points))
    shape = SHAPES[o.shape]
    if shape == "sphere":
        n = lp - np.array([0, 0, o.size])
    elif shape == "cylinder":
        rho = 0.08 * o.size
        radial = np.linalg.norm(lp[:, :2], axis=1, keepdims=True)
        inner = lp[:, :2] * np.minimum(1.0, (o.size - rho) / np.maximum(radial, 1e-9))
        n = np.concatenate([lp[:, :2] - inner, (lp[:, 2:] - np.clip(lp[:, 2:], rho, 2 * o.size - rho))], 1)
    else:
        h, rho = o.half, 0.18 * o.half
        q = lp - np.array([0, 0, h])
        n = q - np.clip(q, -(h - rho), h - rho)
    n = _normalize(n + 1e-12)
    cs, sn = np.cos(o.theta), np.sin(o.theta)
    return n @ np.array([[cs, -sn, 0], [sn, cs, 0], [0, 0, 1]]).T


def _srgb_to_linear(c):
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c):
    c = np.clip(c, 0, 1)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


GROUND = 0.19  # linear albedo of the floor
HORIZON = np.array([0.26, 0.26, 0.27])  # linear radiance the floor fades into
KEY, FILL, BACK, AMBIENT = 1.5, 0.45, 0.35, 0.30
SHADOW_SAMPLES = 4
LIGHT_RADIUS = 0.9  # key light area-light radius (soft shadow width)


def _environment(dirs):
    """Radiance seen by a reflected ray: a bright sky above, darker floor below."""
    up = np.clip(dirs[:, 2:3], -1, 1)
    sky = HORIZON + (np.array([0.75, 0.75, 0.78]) - HORIZON) * np.clip(up, 0, 1) ** 0.5
    floor = np.full_like(sky, 0.12)
    return np.where(up > 0, sky, floor)


def _key_shadow(scene: Scene, objs, points, normals, rng_offsets):
    """Fraction of the key light's disc visible from each point (soft shadow)."""
    key = np.array(scene.key_light)
    start = points + normals * 1e-3
    # Cull once per object with the disc's centre ray and a sphere grown by the disc radius: a sample
    # ray is displaced from the centre ray by at most the radius anywhere between point and light.
    near = [_near(o, start, _normalize(key - start), pad=LIGHT_RADIUS) for o in objs]
    blocked = np.zeros((len(rng_offsets), len(points)), bool)
    for s, off in enumerate(rng_offsets):
        for o, idx in zip(objs, near):
            if len(idx):
                p = start[idx]
                blocked[s, idx] |= np.isfinite(_intersect_exact(o, p, _normalize(key + off - p)))
    return 1.0 - blocked.mean(0)


def _shade(scene, objs, points, normals, albedo, metal, view):
    """Linear radiance at surface points: Lambert key/fill/back, soft key shadow, Blinn-Phong, reflection."""
    key = _normalize(np.array(scene.key_light) - points)
    fill = _normalize(np.array(scene.fill_light) - points)
    back = _normalize(np.array(scene.back_light) - points)
    # Light-disc samples on a fixed pattern: deterministic and identical for every image.
    ang = np.arange(SHADOW_SAMPLES) * 2.399963 + 0.5
    rad = LIGHT_RADIUS * np.sqrt((np.arange(SHADOW_SAMPLES) + 0.5) / SHADOW_SAMPLES)
    offsets = np.stack([rad * np.cos(ang), rad * np.sin(ang), np.zeros_like(ang)], 1)
    vis = _key_shadow(scene, objs, points, normals, offsets)
    ndl = lambda L: np.clip(np.einsum("ij,ij->i", normals, L), 0, None)[:, None]  # noqa: E731
    diffuse = AMBIENT * (0.6 + 0.4 * normals[:, 2:3]) + KEY * ndl(key) * vis[:, None] + FILL * ndl(fill) + BACK * ndl(back)
    half = _normalize(key - view)
    nh = np.clip(np.einsum("ij,ij->i", normals, half), 0, None)[:, None]
    m = metal[:, None]
    refl = view - 2 * np.einsum("ij,ij->i", view, normals)[:, None] * normals
    metal_col = albedo * (0.35 * diffuse + 1.1 * _environment(refl)) + 1.6 * nh**80 * vis[:, None] * (0.5 + 0.5 * albedo)
    rubber_col = albedo * diffuse + 0.08 * nh**12 * vis[:, None]
    return np.where(m, metal_col, rubber_col)


def render(scene: Scene, width: int = 160, height: int = 120, upto: int | None = None, ids: bool = False):
    """Render the first `upto` objects of a scene to an RGBA uint8 image (H, W, 4).

    With ids=True also returns the object-id map (-1 for floor) and each object's unoccluded pixel
    count, which scene sampling uses to reject scenes where an object is hidden.
    """
    objs = scene.objects[: len(scene.objects) if upto is None else upto]
    origin, dirs, t_floor, t_best, hit, alone = _primary_hits(scene, objs, width, height)
    n = len(dirs)
    color = np.empty((n, 3))
    sky = ~np.isfinite(t_best)
    color[sky] = HORIZON
    floor = np.isfinite(t_best) & (hit < 0)
    if floor.any():
        p = origin + t_floor[floor, None] * dirs[floor]
        nrm = np.tile([0.0, 0.0, 1.0], (len(p), 1))
        rad = _shade(scene, objs, p, nrm, np.full((len(p), 3), GROUND), np.zeros(len(p), bool), dirs[floor])
        ao = np.ones(len(p))
        for o in objs:  # contact darkening where an object meets the floor
            d = np.maximum(np.hypot(p[:, 0] - o.x, p[:, 1] - o.y) - o.footprint * 0.85, 0)
            ao *= 1 - 0.45 * np.exp(-d / (0.25 * o.size))
        rad *= ao[:, None]
        dist = np.linalg.norm(p[:, :2] - np.array(scene.target[:2]), axis=1)
        fade = np.clip((dist - 6.0) / 10.0, 0, 1)[:, None]
        color[floor] = rad * (1 - fade) + HORIZON * fade
    for k, o in enumerate(objs):
        sel = hit == k
        if not sel.any():
            continue
        p = origin + t_best[sel, None] * dirs[sel]
        albedo = np.broadcast_to(_srgb_to_linear(PALETTE[o.color]), (len(p), 3))
        color[sel] = _shade(scene, objs, p, normal(o, p), albedo, np.full(len(p), o.metal), dirs[sel])

    rgb = (_linear_to_srgb(color) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)
    img = np.concatenate([rgb, np.full((height, width, 1), 255, np.uint8)], axis=2)
    if ids:
        return img, *_visibility(hit, alone)
    return img


def _primary_hits(scene: Scene, objs, width: int, height: int):
    """Camera rays and what each one sees first: the floor (-1) or object k."""
    origin, dirs = camera_rays(scene, width, height)
    origins = np.broadcast_to(origin, dirs.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(dirs[:, 2] < -1e-6, -origin[2] / dirs[:, 2], np.inf)
    t_best, hit = t_floor.copy(), np.full(len(dirs), -1)
    alone = []
    for k, o in enumerate(objs):
        t = intersect(o, origins, dirs)
        alone.append(int(np.isfinite(t).sum()))
        closer = t < t_best
        t_best[closer], hit[closer] = t[closer], k
    return origin, dirs, t_floor, t_best, hit, alone


def _visibility(hit, alone):
    """Per object: (visible pixels, pixels it would cover alone)."""
    return [int((hit == k).sum()) for k in range(len(alone))], alone


def _random_scene_frame(rng: np.random.Generator):
    """Camera and lights, jittered per scene like CLEVR's."""
    el = np.deg2rad(rng.uniform(32, 38))
    az = np.deg2rad(-90 + rng.uniform(-6, 6))
    dist = rng.uniform(10.0, 10.8)
    cam = (dist * np.cos(el) * np.cos(az), dist * np.cos(el) * np.sin(az), dist * np.sin(el))
    j = lambda s: rng.normal(0, s, 3)  # noqa: E731
    key = np.array([-6.0, -4.0, 9.0]) + j(1.0)
    fill = np.array([7.0, -5.0, 5.0]) + j(1.0)
    back = np.array([1.0, 9.0, 6.0]) + j(1.0)
    return dict(cam_pos=tuple(cam), key_light=tuple(key), fill_light=tuple(fill), back_light=tuple(back))


def box_corners_px(scene: Scene, o: Obj, width: int, height: int) -> np.ndarray:
    """(8, 2) pixel coordinates of the corners of the upright box that holds object `o` (its footprint cylinder's
    square, from the floor to its top)."""
    r, h2 = o.footprint, 2 * o.half
    corners = np.array([[o.x + sx * r, o.y + sy * r, z] for sx in (-1, 1) for sy in (-1, 1) for z in (0, h2)])
    return project(scene, corners, width, height)[0]


def _in_view(scene: Scene, o: Obj, width: int, height: int, margin: float = 0.04) -> bool:
    px = box_corners_px(scene, o, width, height)
    return bool((px[:, 0] > margin * width).all() and (px[:, 0] < (1 - margin) * width).all()
                and (px[:, 1] > margin * height).all() and (px[:, 1] < (1 - margin) * height).all())


def sample_scene(rng: np.random.Generator, classes, width: int = 160, height: int = 120,
                 min_visible: float = 0.55, max_tries: int = 200) -> Scene:
    """A scene holding one object of each class index in `classes` (order kept), all in view,
    none overlapping, and each at least `min_visible` unoccluded in the full scene."""
    names = list(OBJECTS)
    for _ in range(max_tries):
        frame = _random_scene_frame(rng)
        objs: list[Obj] = []
        for cls in classes:
            color, shape = COLORS.index(names[cls].split()[0]), SHAPES.index(names[cls].split()[1])
            for _ in range(100):
                o = Obj(shape, color, float(rng.choice(SIZES)), bool(rng.random() < 0.5),
                        float(rng.uniform(-PLACEMENT, PLACEMENT)), float(rng.uniform(-PLACEMENT, PLACEMENT)),
                        float(rng.uniform(0, 2 * np.pi)))
                if all(np.hypot(o.x - q.x, o.y - q.y) > o.footprint + q.footprint + 0.25 for q in objs) and \
                        _in_view(Scene((), **frame), o, width, height):
                    objs.append(o)
                    break
            else:
                break
        if len(objs) != len(classes):
            continue
        scene = Scene(tuple(objs), **frame)
        if len(objs) == 1:
            return scene
        # Occlusion only grows as objects are added, so checking the full scene covers every prefix.
        *_, hit, alone = _primary_hits(scene, scene.objects, width // 2, height // 2)
        visible, alone = _visibility(hit, alone)
        if all(v >= min_visible * a and v >= 12 for v, a in zip(visible, alone)):
            return scene
    raise RuntimeError(f"could not place objects {classes} in {max_tries} tries")
