"""Procedural specimen photographs for the synthetic BIOSCAN-5M dataset.

Each record is drawn as an insect-like (or spider-, millipede-like) specimen on a bright
background, in the style of the ``cropped_256`` package: shorter side 256 px, the specimen
filling most of the frame.

Appearance is inherited down the taxonomy. A specimen is described by a vector of
:data:`TRAIT_NAMES` in an unbounded "latent" space; the generator draws an order template and
perturbs it per family, genus and species (see ``specimens.py``), so that relatives look alike.
:func:`trait_values` maps a latent vector onto drawing parameters (lengths in body-length
units, colours, pattern). The body plan (wings, elytra, eight legs, many segments) is fixed per
order. Per-specimen variation (a little trait noise, pose, scale, lighting, background, sensor
noise) comes from a random stream seeded by ``(seed, record index)``, so a record's picture
does not depend on which worker draws it or in which order.

Everything the metadata needs (image size, specimen pixel count and bounding box) depends
only on the *geometry* stream, so it can be computed without rendering colours, lighting or
JPEG files (:func:`measure_specimen`).
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Latent traits of a specimen, in order. Each maps to a drawing parameter in :data:`TRAIT_RANGES`.
TRAIT_NAMES: tuple[str, ...] = (
    "head",  # head radius
    "thorax_len",
    "thorax_wid",  # half width
    "abdomen_len",
    "abdomen_wid",  # half width
    "abdomen_tip",  # how pointed the abdomen is
    "segments",  # number of abdominal (or body) segments
    "wing_len",
    "wing_wid",  # half width
    "wing_spread",  # angle between a wing and the body axis, degrees
    "wing_alpha",  # opacity of membranous wings
    "leg_len",
    "leg_thick",
    "leg_spread",  # multiplier of the resting leg angles
    "antenna_len",
    "antenna_spread",  # degrees
    "body_hue",
    "body_sat",
    "body_val",
    "pattern_hue",  # hue offset of the pattern colour
    "pattern_contrast",  # brightness difference of the pattern colour
    "pattern_kind",  # < -0.4: plain, -0.4..0.5: bands, > 0.5: spots
    "wing_tint",
    "fill",  # fraction of the frame the specimen spans
)
NUM_TRAITS = len(TRAIT_NAMES)

#: (low, high) of each trait after the logistic map; body-length units unless noted.
TRAIT_RANGES: dict[str, tuple[float, float]] = {
    "head": (0.055, 0.12),
    "thorax_len": (0.13, 0.28),
    "thorax_wid": (0.07, 0.18),
    "abdomen_len": (0.25, 0.6),
    "abdomen_wid": (0.07, 0.24),
    "abdomen_tip": (0.0, 0.8),
    "segments": (3.0, 9.0),
    "wing_len": (0.45, 0.95),
    "wing_wid": (0.08, 0.22),
    "wing_spread": (4.0, 50.0),
    "wing_alpha": (0.2, 0.65),
    "leg_len": (0.25, 0.75),
    "leg_thick": (0.008, 0.024),
    "leg_spread": (0.7, 1.3),
    "antenna_len": (0.08, 0.6),
    "antenna_spread": (12.0, 60.0),
    "body_hue": (0.0, 1.0),  # wraps; see trait_values
    "body_sat": (0.1, 0.85),
    "body_val": (0.08, 0.6),
    "pattern_hue": (-0.3, 0.3),
    "pattern_contrast": (0.0, 0.6),
    "pattern_kind": (-1.0, 1.0),  # identity: the latent value is thresholded
    "wing_tint": (0.0, 1.0),
    "fill": (0.62, 0.9),
}

#: Body plans; an order draws one from its class's list in :data:`BODY_PLANS_BY_CLASS`.
BODY_PLANS: tuple[str, ...] = ("winged", "elytra", "moth", "ant", "arachnid", "myriapod")
BODY_PLANS_BY_CLASS: dict[str, tuple[str, ...]] = {
    "Insecta": ("winged", "elytra", "moth", "ant", "winged", "elytra", "moth"),
    "Arachnida": ("arachnid",),
    "Collembola": ("ant",),
    "Malacostraca": ("myriapod",),
    "Diplopoda": ("myriapod",),
    "Chilopoda": ("myriapod",),
    "Branchiopoda": ("arachnid",),
    "Ostracoda": ("arachnid",),
}

#: Short side of every image (the ``*_256`` packages).
SHORT_SIDE = 256
#: Longest long side of an image.
MAX_LONG_SIDE = 340
JPEG_QUALITY = 90
#: Standard deviation of the per-specimen trait noise, in latent units.
SPECIMEN_TRAIT_SD = 0.15

_NOISE_TILE = 512
_noise_tiles: dict[int, np.ndarray] = {}


@dataclasses.dataclass(frozen=True)
class SpecimenJob:
    """Everything needed to draw (or measure) one record's image."""

    seed: int
    index: int  # record index in the metadata CSV
    plan: str  # one of BODY_PLANS
    traits: tuple[float, ...]  # latent traits of the record's species, len NUM_TRAITS
    path: str | None = None  # where to write the JPEG; None measures only


@dataclasses.dataclass(frozen=True)
class SpecimenSize:
    """Size facts of a drawn specimen, as the metadata CSV reports them."""

    width: int
    height: int
    pixel_count: int  # pixels of the specimen mask
    bbox_width: int
    bbox_height: int

    @property
    def area_fraction(self) -> float:
        """Bounding-box area over image area, rounded to 4 decimals (BIOSCAN-5M definition)."""
        return round(self.bbox_width * self.bbox_height / (self.width * self.height), 4)

    @property
    def scale_factor(self) -> float:
        """Shorter bounding-box side over 256, rounded to 4 decimals (BIOSCAN-5M definition)."""
        return round(min(self.bbox_width, self.bbox_height) / SHORT_SIDE, 4)


# ----------------------------------------------------------------------------- traits


_TRAIT_LOW = np.array([TRAIT_RANGES[n][0] for n in TRAIT_NAMES])
_TRAIT_SPAN = np.array([TRAIT_RANGES[n][1] - TRAIT_RANGES[n][0] for n in TRAIT_NAMES])


def trait_values(latent: Sequence[float]) -> dict[str, float]:
    """Maps a latent trait vector to drawing parameters (see :data:`TRAIT_RANGES`)."""
    z = np.asarray(latent, dtype=np.float64)
    if z.shape != (NUM_TRAITS,):
        raise ValueError(f"expected {NUM_TRAITS} latent traits, got shape {z.shape}")
    mapped = _TRAIT_LOW + _TRAIT_SPAN / (1.0 + np.exp(-z))
    values = dict(zip(TRAIT_NAMES, mapped.tolist(), strict=True))
    # Hues wrap; centred on browns and ochres, the usual colours of small insects.
    values["body_hue"] = float((0.07 + 0.09 * z[TRAIT_NAMES.index("body_hue")]) % 1.0)
    values["pattern_kind"] = float(z[TRAIT_NAMES.index("pattern_kind")])
    values["segments"] = float(round(values["segments"]))
    return values


def pattern_kind(values: dict[str, float]) -> str:
    """'plain', 'bands' or 'spots', from the latent pattern trait."""
    k = values["pattern_kind"]
    return "plain" if k < -0.4 else ("bands" if k < 0.5 else "spots")


def _hsv(h: float, s: float, v: float, alpha: int = 255) -> tuple[int, int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (int(r * 255), int(g * 255), int(b * 255), alpha)


def _palette(v: dict[str, float]) -> dict[str, tuple[int, int, int, int]]:
    """Body, pattern, eye, highlight and wing colours of a specimen."""
    body = _hsv(v["body_hue"], v["body_sat"], v["body_val"])
    lighter = v["body_val"] < 0.35
    pattern_val = v["body_val"] + (v["pattern_contrast"] if lighter else -v["pattern_contrast"])
    pattern = _hsv(v["body_hue"] + v["pattern_hue"], v["body_sat"] * 0.9 + 0.1, pattern_val)
    tint = v["wing_tint"]
    wing = _hsv(0.08, 0.15 + 0.4 * tint, 0.85 - 0.45 * tint, int(255 * v["wing_alpha"]))
    return {
        "body": body,
        "dark": _hsv(v["body_hue"], v["body_sat"], v["body_val"] * 0.55),
        "pattern": pattern,
        "eye": (25, 18, 15, 255),
        "shine": (255, 255, 255, 55),
        "wing": wing,
        "vein": _hsv(0.08, 0.3, 0.35, 150),
    }


# ----------------------------------------------------------------------------- geometry

# A primitive: (kind, points (n, 2) in body units, rgba, width in body units);
# kind is "poly" (filled polygon) or "line" (polyline of the given width).
Primitive = tuple[str, np.ndarray, tuple[int, int, int, int], float]

_CIRCLE_T = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)
_COS_T, _SIN_T = np.cos(_CIRCLE_T), np.sin(_CIRCLE_T)


def _ellipse(cx: float, cy: float, rx: float, ry: float, tip: float = 0.0, angle: float = 0.0) -> np.ndarray:
    """Polygon of an ellipse (body y axis points to the tail); ``tip`` stretches the tail half."""
    x = rx * _COS_T
    y = ry * _SIN_T * (1.0 + tip * (_SIN_T > 0))
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        x, y = c * x - s * y, s * x + c * y
    return np.stack([cx + x, cy + y], axis=1)


def _polyline(start: tuple[float, float], steps: Sequence[tuple[float, float]]) -> np.ndarray:
    """Points of a jointed limb: start, then each (length, angle) step from the previous joint."""
    pts = [start]
    x, y = start
    for length, angle in steps:
        x, y = x + length * math.cos(angle), y + length * math.sin(angle)
        pts.append((x, y))
    return np.asarray(pts, dtype=np.float64)


def _mirror(points: np.ndarray) -> np.ndarray:
    """Left-right mirror image in body coordinates."""
    return points * np.array([-1.0, 1.0])


def _legs(v, pal, attach_y: Sequence[float], base_angles: Sequence[float], attach_x: float, rng, joints: int = 2):
    """Pairs of jointed legs attached at ``(±attach_x, y)``; base angles in radians from the
    lateral axis, positive towards the tail; each leg bends once (or more) at its joints."""
    prims: list[Primitive] = []
    length = v["leg_len"]
    for y, base in zip(attach_y, base_angles, strict=True):
        for side in (1.0, -1.0):
            a = base * v["leg_spread"] + rng.normal(0.0, 0.12)
            bend = (0.55 if base >= 0 else -0.55) + rng.normal(0.0, 0.1)
            steps = [(length * 0.45, a)] + [(length * 0.55 / (joints - 1), a + bend)] * (joints - 1)
            pts = _polyline((attach_x, y), steps)
            prims.append(("line", pts if side > 0 else _mirror(pts), pal["dark"], v["leg_thick"]))
    return prims


def _antennae(v, pal, head_y: float, head_r: float, rng, elbowed: bool = False, width_scale: float = 0.6):
    """A pair of two-segment antennae from the front of the head (bent outwards if elbowed)."""
    prims: list[Primitive] = []
    spread = math.radians(v["antenna_spread"])
    for side in (1.0, -1.0):
        a = -math.pi / 2 + spread + rng.normal(0.0, 0.08)
        if elbowed:
            steps = [(v["antenna_len"] * 0.4, a), (v["antenna_len"] * 0.6, a + 0.9)]
        else:
            steps = [(v["antenna_len"] * 0.5, a), (v["antenna_len"] * 0.5, a + 0.25)]
        pts = _polyline((head_r * 0.35, head_y - head_r * 0.8), steps)
        prims.append(("line", pts if side > 0 else _mirror(pts), pal["dark"], v["leg_thick"] * width_scale))
    return prims


def _abdomen_pattern(v, pal, cy: float, rx: float, ry: float, rng) -> list[Primitive]:
    """Bands across, or spots along, an abdomen centred at (0, cy)."""
    kind = pattern_kind(v)
    prims: list[Primitive] = []
    n = int(v["segments"])
    if kind == "bands":
        for i in range(1, n):
            t = -1.0 + 2.0 * i / n
            half = rx * math.sqrt(max(1.0 - t * t, 0.0)) * 0.97
            prims.append(("poly", _ellipse(0.0, cy + t * ry, half, ry / (2.2 * n)), pal["pattern"], 0.0))
    elif kind == "spots":
        for i in range(1, n):
            t = -0.8 + 1.6 * i / n
            half = rx * math.sqrt(max(1.0 - t * t, 0.0))
            r = min(half * 0.35, ry / n)
            for side in (0.45, -0.45):
                prims.append(("poly", _ellipse(side * half, cy + t * ry, r, r), pal["pattern"], 0.0))
    return prims


def _head(v, pal, head_y: float) -> list[Primitive]:
    """Round head with two large dark eyes."""
    r = v["head"]
    prims: list[Primitive] = [("poly", _ellipse(0.0, head_y, r, r * 0.9), pal["body"], 0.0)]
    for side in (1.0, -1.0):
        prims.append(("poly", _ellipse(side * r * 0.62, head_y - r * 0.15, r * 0.38, r * 0.48), pal["eye"], 0.0))
    return prims


def _shine(cx: float, cy: float, rx: float, ry: float, pal) -> Primitive:
    """A faint highlight on a body part, towards its front-left."""
    return ("poly", _ellipse(cx - rx * 0.3, cy - ry * 0.3, rx * 0.35, ry * 0.3), pal["shine"], 0.0)


def _insect_body(v, pal, rng, waist: bool = False) -> tuple[list[Primitive], dict[str, float]]:
    """Head, thorax and abdomen of a six-legged insect (behind: legs and antennae)."""
    head_r, tl, tw = v["head"], v["thorax_len"], v["thorax_wid"]
    al, aw = v["abdomen_len"], v["abdomen_wid"]
    head_y = -tl / 2 - head_r * 0.8
    gap = 0.05 if waist else 0.0
    ab_cy = tl / 2 + gap + al / 2 * 0.9
    prims: list[Primitive] = []
    prims += _legs(v, pal, (-tl * 0.3, 0.0, tl * 0.3), (-0.6, 0.1, 0.7), tw * 0.6, rng)
    prims += _antennae(v, pal, head_y, head_r, rng, elbowed=waist)
    prims.append(("poly", _ellipse(0.0, ab_cy, aw, al / 2, tip=v["abdomen_tip"]), pal["body"], 0.0))
    prims += _abdomen_pattern(v, pal, ab_cy, aw, al / 2, rng)
    if waist:
        prims.append(("poly", _ellipse(0.0, tl / 2 + gap * 0.4, tw * 0.3, gap * 0.9), pal["dark"], 0.0))
    prims.append(("poly", _ellipse(0.0, 0.0, tw, tl / 2), pal["body"], 0.0))
    prims.append(_shine(0.0, 0.0, tw, tl / 2, pal))
    prims += _head(v, pal, head_y)
    prims.append(_shine(0.0, ab_cy, aw, al / 2, pal))
    return prims, {"head_y": head_y, "ab_cy": ab_cy}


def _winged(v, pal, rng) -> list[Primitive]:
    """Fly or wasp: two membranous, translucent wings over the body, with a vein each."""
    prims, _ = _insect_body(v, pal, rng)
    spread = math.radians(v["wing_spread"]) + rng.normal(0.0, 0.06)
    wl, ww = v["wing_len"], v["wing_wid"]
    for side in (1.0, -1.0):
        angle = math.pi / 2 - spread  # from the lateral axis, pointing tailwards
        cx, cy = math.cos(angle) * wl / 2, -v["thorax_len"] * 0.2 + math.sin(angle) * wl / 2
        wing = _ellipse(cx, cy, wl / 2, ww, angle=angle)
        vein = _polyline((0.0, -v["thorax_len"] * 0.2), [(wl * 0.9, angle - 0.06)])
        if side < 0:
            wing, vein = _mirror(wing), _mirror(vein)
        prims.append(("poly", wing, pal["wing"], 0.0))
        prims.append(("line", vein, pal["vein"], v["leg_thick"] * 0.35))
    return prims


def _elytra(v, pal, rng) -> list[Primitive]:
    """Beetle: hardened fore wings (elytra) cover the abdomen, with a seam down the middle."""
    prims, geo = _insect_body(v, pal, rng)
    aw, al, tl, cy = v["abdomen_wid"] * 1.12, v["abdomen_len"] * 1.05, v["thorax_len"], geo["ab_cy"]
    cover = pal["pattern"] if pattern_kind(v) == "plain" and v["pattern_contrast"] > 0.3 else pal["body"]
    for side in (1.0, -1.0):
        half = _ellipse(side * aw * 0.5, cy - 0.02, aw * 0.52, al / 2, tip=v["abdomen_tip"] * 0.5)
        prims.append(("poly", half, cover, 0.0))
    if pattern_kind(v) == "spots":
        prims += _abdomen_pattern(v, pal, cy, aw * 0.9, al / 2 * 0.9, rng)
    seam = np.array([[0.0, tl / 2], [0.0, cy + al / 2 * 0.95]])
    prims.append(("line", seam, pal["dark"], v["leg_thick"] * 0.4))
    prims.append(_shine(aw * 0.4, cy, aw * 0.5, al / 2, pal))
    return prims


def _moth(v, pal, rng) -> list[Primitive]:
    """Moth: broad opaque fore and hind wings, with a pattern spot on each fore wing."""
    prims, geo = _insect_body(v, pal, rng)
    wl, ww = v["wing_len"] * 0.9, v["wing_wid"] * 2.0
    spread = math.radians(v["wing_spread"] + 25.0) + rng.normal(0.0, 0.05)
    opaque = (*pal["body"][:3], 235)
    pattern = (*pal["pattern"][:3], 235)
    for side in (1.0, -1.0):
        base = np.array([0.0, -v["thorax_len"] * 0.25])
        a = math.pi / 2 - spread
        tip = base + wl * np.array([math.cos(a), math.sin(a)])
        rear = base + np.array([ww * 0.4, wl * 0.75])
        fore = np.stack([base, base + [ww * 0.6, -0.02], tip, tip + [0.02, ww * 0.5], rear])
        hind = np.stack([base + [0.0, 0.06], base + [ww * 0.9, wl * 0.35], rear + [0.0, 0.05]])
        spot = _ellipse(*(base * 0.4 + tip * 0.6), ww * 0.22, ww * 0.18)
        parts = [(hind, opaque), (fore, opaque), (spot, pattern)]
        for pts, colour in parts:
            prims.append(("poly", pts if side > 0 else _mirror(pts), colour, 0.0))
    return prims


def _ant(v, pal, rng) -> list[Primitive]:
    """Ant or springtail: wingless, narrow waist, elbowed antennae."""
    prims, _ = _insect_body(v, pal, rng, waist=True)
    return prims


def _arachnid(v, pal, rng) -> list[Primitive]:
    """Spider-like: cephalothorax and round abdomen, four pairs of long legs, pedipalps."""
    tl, tw, al, aw = v["thorax_len"] * 1.2, v["thorax_wid"] * 1.3, v["abdomen_len"] * 0.9, v["abdomen_wid"] * 1.4
    ab_cy = tl / 2 + al / 2 * 0.85
    ys = np.linspace(-tl * 0.35, tl * 0.35, 4)
    prims: list[Primitive] = []
    prims += _legs(v, pal, tuple(ys), (-0.9, -0.3, 0.3, 0.9), tw * 0.7, rng, joints=3)
    for side in (1.0, -1.0):  # pedipalps
        pts = _polyline((tw * 0.3, -tl / 2), [(0.08, -1.9), (0.06, -1.3)])
        prims.append(("line", pts if side > 0 else _mirror(pts), pal["dark"], v["leg_thick"]))
    prims.append(("poly", _ellipse(0.0, ab_cy, aw, al / 2, tip=v["abdomen_tip"] * 0.4), pal["body"], 0.0))
    prims += _abdomen_pattern(v, pal, ab_cy, aw, al / 2, rng)
    prims.append(("poly", _ellipse(0.0, 0.0, tw, tl / 2), pal["dark"], 0.0))
    prims.append(_shine(0.0, ab_cy, aw, al / 2, pal))
    for i, side in enumerate((1.0, -1.0, 0.5, -0.5)):  # eyes
        eye = _ellipse(side * tw * 0.25, -tl * (0.38 - 0.05 * (i // 2)), 0.012, 0.012)
        prims.append(("poly", eye, pal["eye"], 0.0))
    return prims


def _myriapod(v, pal, rng) -> list[Primitive]:
    """Millipede-like: a gently curved chain of segments with a pair of short legs each."""
    n = int(v["segments"]) * 2 + 4
    seg_len = 1.0 / n
    width = v["thorax_wid"] * 0.8
    curve = rng.normal(0.0, 0.6)
    ts = np.linspace(-0.5, 0.5, n)
    xs = curve * (ts**2 - 0.25) * 0.5
    prims: list[Primitive] = []
    for i, (x, y) in enumerate(zip(xs, ts, strict=True)):
        for side in (1.0, -1.0):
            a = (0.2 * (i / n - 0.5)) + rng.normal(0.0, 0.1)
            pts = _polyline((x + side * width * 0.8, y), [(v["leg_len"] * 0.25, a if side > 0 else math.pi - a)])
            prims.append(("line", pts, pal["dark"], v["leg_thick"] * 0.7))
    for i, (x, y) in enumerate(zip(xs, ts, strict=True)):
        colour = pal["pattern"] if (pattern_kind(v) == "bands" and i % 2) else pal["body"]
        prims.append(("poly", _ellipse(x, y, width, seg_len * 0.75), colour, 0.0))
    prims += _antennae(v, pal, ts[0] - seg_len, v["head"] * 0.6, rng, width_scale=0.5)
    prims.append(("poly", _ellipse(xs[0], ts[0] - seg_len * 0.6, width * 0.9, seg_len * 0.8), pal["dark"], 0.0))
    return prims


_PLAN_DRAWERS = {
    "winged": _winged,
    "elytra": _elytra,
    "moth": _moth,
    "ant": _ant,
    "arachnid": _arachnid,
    "myriapod": _myriapod,
}


def specimen_primitives(plan: str, values: dict[str, float], rng: np.random.Generator) -> list[Primitive]:
    """The specimen's shapes in body coordinates (head towards -y), in drawing order."""
    if plan not in _PLAN_DRAWERS:
        raise ValueError(f"Unknown body plan {plan!r}; valid: {', '.join(BODY_PLANS)}")
    return _PLAN_DRAWERS[plan](values, _palette(values), rng)


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the specimen goes: image size and the body→pixel affine map."""

    width: int
    height: int
    matrix: np.ndarray  # (2, 2): rotation, mirror and scale
    offset: np.ndarray  # (2,): translation in pixels
    scale: float  # pixels per body unit


def _layout(prims: Sequence[Primitive], fill: float, rng: np.random.Generator) -> _Layout:
    """Random pose and frame: rotation, mirror, scale to ``fill`` of the frame, jittered centre."""
    theta = rng.uniform(0.0, 2.0 * np.pi)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]]) @ np.diag([mirror, 1.0])
    pts = np.concatenate([p[1] for p in prims]) @ rot.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = np.maximum(hi - lo, 1e-3)
    long_side = SHORT_SIDE + int(rng.integers(0, MAX_LONG_SIDE - SHORT_SIDE + 1))
    landscape = (extent[0] >= extent[1]) == (rng.random() < 0.85)
    width, height = (long_side, SHORT_SIDE) if landscape else (SHORT_SIDE, long_side)
    size = np.array([width, height], dtype=np.float64)
    scale = fill * rng.uniform(0.85, 1.0) * float(np.min(size / extent))
    room = size - extent * scale
    centre = size / 2 + rng.uniform(-0.35, 0.35, size=2) * room
    offset = centre - (lo + hi) / 2 * scale
    return _Layout(width, height, rot * scale, offset, scale)


def _draw(draw: ImageDraw.ImageDraw, prims: Sequence[Primitive], layout: _Layout, colour=None) -> None:
    """Draws primitives in pixel space; ``colour`` overrides every fill (for masks)."""
    for kind, pts, rgba, width in prims:
        xy = (pts @ layout.matrix.T + layout.offset).ravel().tolist()
        fill = rgba if colour is None else colour
        if kind == "poly":
            draw.polygon(xy, fill=fill)
        else:
            w = max(1, int(round(width * layout.scale)))
            draw.line(xy, fill=fill, width=w, joint="curve")


def _geometry(job: SpecimenJob) -> tuple[list[Primitive], _Layout, dict[str, float]]:
    """The specimen's primitives and layout, from the job's geometry stream only."""
    rng = np.random.default_rng([job.seed, job.index, 0])
    latent = np.asarray(job.traits, dtype=np.float64) + rng.normal(0.0, SPECIMEN_TRAIT_SD, NUM_TRAITS)
    values = trait_values(latent)
    prims = specimen_primitives(job.plan, values, rng)
    return prims, _layout(prims, values["fill"], rng), values


def _mask(prims: Sequence[Primitive], layout: _Layout) -> Image.Image:
    mask = Image.new("L", (layout.width, layout.height), 0)
    _draw(ImageDraw.Draw(mask), prims, layout, colour=255)
    return mask


def _size_of(mask: Image.Image) -> SpecimenSize:
    bbox = mask.getbbox() or (0, 0, 0, 0)
    hist = mask.histogram()
    return SpecimenSize(
        width=mask.width,
        height=mask.height,
        pixel_count=mask.width * mask.height - hist[0],
        bbox_width=bbox[2] - bbox[0],
        bbox_height=bbox[3] - bbox[1],
    )


# ----------------------------------------------------------------------------- rendering


def _noise_tile(seed: int) -> np.ndarray:
    """A (512, 512, 3) float32 standard-normal tile, the same in every process for a seed."""
    tile = _noise_tiles.get(seed)
    if tile is None:
        tile = np.random.default_rng([seed, 2**31 - 1]).standard_normal((_NOISE_TILE, _NOISE_TILE, 3), dtype=np.float32)
        _noise_tiles.clear()
        _noise_tiles[seed] = tile
    return tile


def _background_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light grey-beige plate colour."""
    base = rng.uniform(0.79, 0.88)
    tint = rng.normal(0.0, 0.015, size=3) + np.array([0.004, 0.002, 0.0])
    return tuple(int(255 * min(max(base + t, 0.0), 1.0)) for t in tint)


def _finish(image: Image.Image, rng: np.random.Generator, seed: int) -> Image.Image:
    """Lighting (brightness, gradient, vignette) and sensor noise."""
    w, h = image.size
    arr = np.asarray(image, dtype=np.float32)
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    ys = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    phi = rng.uniform(0.0, 2.0 * np.pi)
    gain = rng.uniform(0.93, 1.07) + rng.uniform(0.0, 0.07) * (math.cos(phi) * xs + math.sin(phi) * ys)
    gain = gain - rng.uniform(0.0, 0.06) * (xs * xs + ys * ys)
    tile = _noise_tile(seed)
    oy, ox = rng.integers(0, _NOISE_TILE - h + 1), rng.integers(0, _NOISE_TILE - w + 1)
    noise = tile[oy : oy + h, ox : ox + w] * rng.uniform(2.0, 5.0)
    arr = arr * gain[..., None] + noise
    return Image.fromarray(np.clip(arr, 0.0, 255.0).astype(np.uint8), "RGB")


def render_specimen(job: SpecimenJob) -> tuple[Image.Image, SpecimenSize]:
    """Draws the record's photograph; returns it with its size facts."""
    prims, layout, _ = _geometry(job)
    size = _size_of(_mask(prims, layout))
    look = np.random.default_rng([job.seed, job.index, 1])
    image = Image.new("RGB", (layout.width, layout.height), _background_colour(look))
    _draw(ImageDraw.Draw(image, "RGBA"), prims, layout)
    return _finish(image, look, job.seed), size


def specimen_mask(job: SpecimenJob) -> Image.Image:
    """The record's specimen mask ("L" image, 255 on the specimen), as drawn in its photograph."""
    prims, layout, _ = _geometry(job)
    return _mask(prims, layout)


def measure_specimen(job: SpecimenJob) -> SpecimenSize:
    """Size facts of the record's specimen without rendering the photograph."""
    return _size_of(specimen_mask(job))


def jpeg_bytes(image: Image.Image) -> bytes:
    """Baseline JPEG at :data:`JPEG_QUALITY`, no metadata, deterministic bytes."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def process_job(job: SpecimenJob) -> SpecimenSize:
    """Measures a job, and renders and writes its JPEG when ``job.path`` is set (pool worker)."""
    if job.path is None:
        return measure_specimen(job)
    image, size = render_specimen(job)
    os.makedirs(os.path.dirname(job.path), exist_ok=True)
    with open(job.path, "wb") as f:
        f.write(jpeg_bytes(image))
    return size
