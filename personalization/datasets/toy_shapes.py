"""The objects of the toy benchmark: one silhouette and base colour per category, fine detail per instance.

An object is an RGBA *sprite* (square, side ``R``) drawn from a category's parts in normalized coordinates
(u, v in [0, 1]): ``body`` parts carry the instance's detail, ``trim`` parts (handle, cap, shaft) are plain.
Instances of one category share silhouette, base colour and shading, and differ only in

- a surface pattern on the body: stripes, dots or checks at a frequency (cycles per sprite side) and angle,
  drawn in a darker shade of the base colour (so the mean colour barely moves);
- a small marking shape (circle, triangle, square, star, diamond, cross) in off-white;
- a thin accent band in one of six colours.

So a category-level feature (mean colour, silhouette) finds the category but not the instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PATTERNS = ("stripes", "dots", "checks")
MARKINGS = ("circle", "triangle", "square", "star", "diamond", "cross")
ACCENTS = ((196, 62, 58), (226, 186, 64), (236, 236, 230), (44, 44, 48), (148, 82, 168), (228, 128, 52))
MARK_COLOUR = np.array([244, 242, 236], dtype=np.float64)


@dataclass(frozen=True)
class CategoryShape:
    """Parts as (shape, coords, role): shape in {rect, round, ellipse, ring, poly}; role in {body, trim, dark}."""

    name: str
    base: tuple[int, int, int]
    trim: tuple[int, int, int]
    parts: tuple[tuple, ...]
    band: tuple[float, float]  # accent band rows (v0, v1) across the body
    mark: tuple[float, float, float]  # marking centre (u, v) and half size


CATEGORIES: dict[str, CategoryShape] = {
    "mug": CategoryShape(
        "mug",
        (66, 112, 178),
        (58, 98, 156),
        (
            ("ring", (0.6, 0.34, 0.9, 0.72, 0.07), "trim"),
            ("round", (0.16, 0.2, 0.68, 0.9, 0.06), "body"),
            ("ellipse", (0.16, 0.15, 0.68, 0.26), "dark"),
        ),
        band=(0.77, 0.8),
        mark=(0.42, 0.52, 0.085),
    ),
    "bottle": CategoryShape(
        "bottle",
        (58, 140, 92),
        (84, 86, 90),
        (
            ("poly", ((0.3, 0.4), (0.42, 0.22), (0.58, 0.22), (0.7, 0.4)), "trim"),
            ("rect", (0.43, 0.1, 0.57, 0.24), "trim"),
            ("rect", (0.41, 0.03, 0.59, 0.11), "dark"),
            ("round", (0.3, 0.36, 0.7, 0.95, 0.07), "body"),
        ),
        band=(0.45, 0.48),
        mark=(0.5, 0.7, 0.085),
    ),
    "tote": CategoryShape(
        "tote",
        (196, 164, 116),
        (150, 120, 82),
        (
            ("ring", (0.24, 0.1, 0.5, 0.56, 0.045), "trim"),
            ("ring", (0.5, 0.1, 0.76, 0.56, 0.045), "trim"),
            ("poly", ((0.14, 0.38), (0.86, 0.38), (0.92, 0.94), (0.08, 0.94)), "body"),
        ),
        band=(0.44, 0.47),
        mark=(0.5, 0.68, 0.09),
    ),
    "screwdriver": CategoryShape(
        "screwdriver",
        (186, 58, 50),
        (168, 168, 176),
        (
            ("rect", (0.47, 0.06, 0.53, 0.48), "trim"),
            ("poly", ((0.47, 0.06), (0.53, 0.06), (0.5, 0.01)), "trim"),
            ("rect", (0.41, 0.44, 0.59, 0.52), "trim"),
            ("round", (0.33, 0.5, 0.67, 0.96, 0.09), "body"),
        ),
        band=(0.57, 0.6),
        mark=(0.5, 0.78, 0.075),
    ),
}


@dataclass(frozen=True)
class InstanceLook:
    """The fine detail that tells one instance from its category siblings."""

    category: str
    pattern: str
    frequency: float  # cycles per sprite side
    angle: float  # degrees
    marking: str
    accent: tuple[int, int, int]


def make_looks(category: str, count: int, rng: np.random.Generator) -> list[InstanceLook]:
    """``count`` distinct looks for one category (markings are all different up to six instances)."""
    markings = rng.permutation(len(MARKINGS))
    accents = rng.permutation(len(ACCENTS))
    offset = int(rng.integers(3))
    looks = []
    for j in range(count):
        looks.append(
            InstanceLook(
                category=category,
                pattern=PATTERNS[(j + offset) % len(PATTERNS)],
                frequency=float((10, 14, 18)[(j // len(PATTERNS) + j) % 3] + rng.uniform(-1.0, 1.0)),
                angle=float((0, 45, 90, 135)[(j * 3 + offset) % 4]),
                marking=MARKINGS[markings[j % len(MARKINGS)]],
                accent=ACCENTS[accents[j % len(ACCENTS)]],
            )
        )
    return looks


def _draw_part(draw: ImageDraw.ImageDraw, shape: str, coords: tuple, side: int) -> None:
    s = side
    if shape == "rect":
        draw.rectangle([c * s for c in coords], fill=255)
    elif shape == "round":
        *box, radius = coords
        draw.rounded_rectangle([c * s for c in box], radius=radius * s, fill=255)
    elif shape == "ellipse":
        draw.ellipse([c * s for c in coords], fill=255)
    elif shape == "ring":
        *box, width = coords
        draw.ellipse([c * s for c in box], outline=255, width=max(1, round(width * s)))
    elif shape == "poly":
        draw.polygon([(u * s, v * s) for u, v in coords], fill=255)


def _marking(shape: str, centre: tuple[float, float], half: float) -> list[tuple[str, list]]:
    """A marking as drawing ops in pixel coordinates."""
    cx, cy = centre
    h = half
    if shape == "circle":
        return [("ellipse", [cx - h, cy - h, cx + h, cy + h])]
    if shape == "square":
        return [("rect", [cx - 0.8 * h, cy - 0.8 * h, cx + 0.8 * h, cy + 0.8 * h])]
    if shape == "triangle":
        return [("poly", [(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)])]
    if shape == "diamond":
        return [("poly", [(cx, cy - h), (cx + 0.75 * h, cy), (cx, cy + h), (cx - 0.75 * h, cy)])]
    if shape == "cross":
        w = 0.32 * h
        return [("rect", [cx - h, cy - w, cx + h, cy + w]), ("rect", [cx - w, cy - h, cx + w, cy + h])]
    angles = np.pi / 2 + np.arange(10) * np.pi / 5  # a five-pointed star
    radii = np.where(np.arange(10) % 2 == 0, h, 0.45 * h)
    return [("poly", [(cx + r * np.cos(a), cy - r * np.sin(a)) for a, r in zip(angles, radii, strict=True)])]


def _pattern(look: InstanceLook, side: int) -> np.ndarray:
    """Boolean (side, side) pattern in sprite coordinates, 45-50 % coverage (so the mean colour hardly moves)."""
    grid = (np.arange(side) + 0.5) / side
    v, u = np.meshgrid(grid, grid, indexing="ij")
    theta = np.deg2rad(look.angle)
    a = u * np.cos(theta) + v * np.sin(theta)
    b = -u * np.sin(theta) + v * np.cos(theta)
    f = look.frequency
    if look.pattern == "stripes":
        return np.sin(2 * np.pi * f * a) > 0.15  # 45 % coverage
    if look.pattern == "checks":
        return (np.floor(f * a) + np.floor(f * b)) % 2 == 0
    da, db = (f * a) % 1 - 0.5, (f * b) % 1 - 0.5
    return da**2 + db**2 < 0.38**2  # 45 % coverage


def render_sprite(look: InstanceLook, side: int) -> Image.Image:
    """The object as an RGBA image (side x side); transparent pixels carry the base colour (no dark fringes)."""
    shape = CATEGORIES[look.category]
    layers = {role: Image.new("L", (side, side), 0) for role in ("body", "trim", "dark")}
    for kind, coords, role in shape.parts:
        _draw_part(ImageDraw.Draw(layers[role]), kind, coords, side)
    body, trim, dark = (np.asarray(layers[r]) > 127 for r in ("body", "trim", "dark"))
    trim &= ~body  # the body is drawn on top of handles and necks
    base = np.array(shape.base, dtype=np.float64)
    rgb = np.broadcast_to(base, (side, side, 3)).copy()
    rgb[trim] = shape.trim
    rgb[dark] = base * 0.45
    rgb[body & _pattern(look, side)] = base * 0.7
    rows = np.arange(side) / side
    band = (rows >= shape.band[0]) & (rows < shape.band[1])
    rgb[body & band[:, None]] = look.accent
    mark = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mark)
    painters = {"rect": draw.rectangle, "ellipse": draw.ellipse, "poly": draw.polygon}
    for op, coords in _marking(look.marking, (shape.mark[0] * side, shape.mark[1] * side), shape.mark[2] * side):
        painters[op](coords, fill=255)
    rgb[body & (np.asarray(mark) > 127)] = MARK_COLOUR
    # Cylinder-like shading across u, the same for every instance: it reads as one object family.
    u = np.arange(side) / side
    rgb *= (0.78 + 0.32 * np.sin(np.pi * u))[None, :, None]
    alpha = ((body | trim | dark) * 255).astype(np.uint8)
    rgb[alpha == 0] = base
    return Image.fromarray(np.dstack([np.clip(rgb, 0, 255).astype(np.uint8), alpha]), mode="RGBA")
