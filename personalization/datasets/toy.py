"""A small PODS-layout benchmark drawn procedurally: a stand-in for PODS that runs anywhere in seconds.

Usage::

    personalize make-toy --out data/toy [--seed 0] [--size 224]
    personalize ingest data.root=data/toy output_dir=outputs/toy

or from Python: ``make_toy("data/toy", seed=0)``.

What it draws (see ``toy_shapes`` for the objects): 4 categories (mug, bottle, tote, screwdriver), by default
2 val + 3 test instances each. Instances of a category share silhouette and base colour and differ only in fine
detail (a surface pattern, a small marking, a thin accent band), so a category-level feature finds the category
but not the instance, while the detail stays visible at 224 px for a fine-tuned encoder to learn.

Scenes (one RGB image + the target's mask each):

- ``train`` / ``in_distribution``: the object upright-ish (+-8 deg, scale 0.85-1.05) on a plain textured
  background (wall + table, low-frequency shading, grain);
- ``pose``: rotated 25-180 deg, scaled 0.55-1.1, flipped half the time, perspective-warped;
- ``distractors``: 2-4 other objects (some of the same category) around it on a cluttered background;
- ``pose_and_distractors``: both; ``test_dense``: distractors with mild pose (for detection / segmentation).

Written layout: ``train/``, ``train_masks/``, ``test/``, ``test_masks/``, ``test_dense/``, ``test_dense_masks/``
(``<instance>/<stem>.jpg`` images, ``.png`` masks), ``pods_info.json`` and ``pods_image_annos.json`` (keyed by
path relative to the root; ``split`` is "test" for every annotated image). Every image draws from its own
``numpy`` generator seeded by (seed, category, instance, scene, index): same seed -> byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from personalization.datasets.images import DatasetError
from personalization.datasets.layouts import TEST_SPLITS
from personalization.datasets.toy_shapes import CATEGORIES, make_looks, render_sprite

TOY_CATEGORIES = ("mug", "bottle", "tote", "screwdriver")
SCENES = ("train", *TEST_SPLITS, "test_dense")
_FOLDERS = ("train", "train_masks", "test", "test_masks", "test_dense", "test_dense_masks")
_WALLS = ((214, 208, 196), (188, 196, 204), (226, 220, 210), (200, 190, 170), (210, 200, 215), (180, 186, 170))
_TABLES = ((172, 160, 146), (150, 140, 128), (120, 110, 100), (196, 182, 160), (140, 148, 150), (98, 92, 88))


@dataclass(frozen=True)
class Pose:
    scale: float  # sprite side as a fraction of 0.6 * image size
    angle: float  # degrees, counter-clockwise
    flip: bool
    warp: float  # perspective strength: fraction of the side an edge shrinks by
    centre: tuple[float, float]  # pixels


def _sample_pose(rng: np.random.Generator, scene: str, size: int) -> Pose:
    posed = scene in ("pose", "pose_and_distractors")
    crowded = scene in ("distractors", "pose_and_distractors", "test_dense")
    if posed:
        scale, angle = rng.uniform(0.55, 1.1), rng.choice([-1, 1]) * rng.uniform(25, 180)
        flip, warp = bool(rng.random() < 0.5), rng.uniform(0.08, 0.25)
    elif scene == "test_dense":
        scale, angle, flip, warp = rng.uniform(0.6, 0.85), rng.uniform(-25, 25), bool(rng.random() < 0.5), 0.0
    else:
        scale, angle, flip, warp = rng.uniform(0.85, 1.05), rng.uniform(-8, 8), False, 0.0
    if crowded:
        scale *= 0.8
    jitter = 0.18 if crowded or posed else 0.08
    centre = tuple(size * (0.5 + rng.uniform(-jitter, jitter, 2)))
    return Pose(float(scale), float(angle), flip, float(warp), (float(centre[0]), float(centre[1])))


def _perspective_coeffs(rng: np.random.Generator, side: int, warp: float) -> list[float]:
    """Coefficients mapping output to input pixels for a random 'tilt': one edge shrinks by ``warp * side``."""
    src = np.array([(0, 0), (side, 0), (side, side), (0, side)], dtype=np.float64)
    dst = src.copy()
    edge = int(rng.integers(4))
    d = warp * side
    moves = {
        0: [(d, 0), (-d, 0), (0, 0), (0, 0)],
        1: [(0, 0), (0, d), (0, -d), (0, 0)],
        2: [(0, 0), (0, 0), (-d, 0), (d, 0)],
        3: [(0, d), (0, 0), (0, 0), (0, -d)],
    }[edge]
    dst += np.array(moves)
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows), src.reshape(-1)).tolist()


def _place(sprite: Image.Image, pose: Pose, base_side: int, rng: np.random.Generator) -> Image.Image:
    """Resize, flip, warp and rotate an RGBA sprite."""
    side = max(8, round(base_side * pose.scale))
    fill = sprite.getpixel((0, 0))  # a transparent corner that carries the base colour
    image = sprite.resize((side, side), Image.Resampling.BICUBIC)
    if pose.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if pose.warp > 0:
        coeffs = _perspective_coeffs(rng, side, pose.warp)
        image = image.transform(
            (side, side), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC, fillcolor=fill
        )
    if abs(pose.angle) > 0.5:
        image = image.rotate(pose.angle, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)
    return image


def _composite(canvas: np.ndarray, sprite: Image.Image, centre: tuple[float, float]) -> np.ndarray:
    """Alpha-blend ``sprite`` onto ``canvas`` (H, W, 3 float) in place; returns its (H, W) alpha footprint."""
    height, width = canvas.shape[:2]
    rgba = np.asarray(sprite, dtype=np.float64)
    h, w = rgba.shape[:2]
    top, left = round(centre[1] - h / 2), round(centre[0] - w / 2)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, height), min(left + w, width)
    footprint = np.zeros((height, width))
    if y0 >= y1 or x0 >= x1:
        return footprint
    patch = rgba[y0 - top : y1 - top, x0 - left : x1 - left]
    alpha = patch[..., 3:] / 255.0
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - alpha) + patch[..., :3] * alpha
    footprint[y0:y1, x0:x1] = alpha[..., 0]
    return footprint


def _background(rng: np.random.Generator, size: int, cluttered: bool) -> np.ndarray:
    """(size, size, 3) float: wall over table with soft shading and grain; clutter adds random shapes."""
    wall = np.array(_WALLS[rng.integers(len(_WALLS))], dtype=np.float64) + rng.uniform(-12, 12, 3)
    table = np.array(_TABLES[rng.integers(len(_TABLES))], dtype=np.float64) + rng.uniform(-12, 12, 3)
    horizon = int(size * rng.uniform(0.55, 0.8))
    canvas = np.empty((size, size, 3))
    canvas[:horizon], canvas[horizon:] = wall, table
    rows = np.arange(size - horizon)[:, None, None]
    canvas[horizon:] += 6 * np.sin(rows * rng.uniform(0.3, 0.8) + rng.uniform(0, 6))  # wood grain
    coarse = Image.fromarray((128 + 40 * np.clip(rng.normal(size=(4, 4)), -3, 3)).astype(np.uint8), mode="L")
    shading = (np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) - 128) / 40
    canvas += 10 * shading[..., None]
    canvas += rng.normal(0, 3, canvas.shape)  # sensor grain
    if cluttered:
        layer = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(layer)
        for _ in range(int(rng.integers(8, 15))):
            x, y = rng.uniform(0, size, 2)
            rx, ry = rng.uniform(0.04, 0.16, 2) * size
            colour = tuple(int(c) for c in rng.integers(30, 240, 3))
            box = [x - rx, y - ry, x + rx, y + ry]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        canvas = np.asarray(layer, dtype=np.float64)
    return canvas


def render_scene(
    rng: np.random.Generator,
    scene: str,
    size: int,
    target: Image.Image,
    same_category: Sequence[Image.Image],
    other_category: Sequence[Image.Image],
) -> tuple[Image.Image, np.ndarray]:
    """One test or train image of ``target`` (RGBA sprite) and its boolean (size, size) mask."""
    crowded = scene in ("distractors", "pose_and_distractors", "test_dense")
    canvas = _background(rng, size, cluttered=crowded)
    base_side = round(0.6 * size)
    if crowded:
        picks = []
        for pool in (same_category, other_category):
            count = min(int(rng.integers(1, 3)), len(pool))
            picks += [pool[i] for i in rng.choice(len(pool), count, replace=False)]
        for sprite in picks:
            pose = Pose(
                float(rng.uniform(0.4, 0.6)),
                float(rng.uniform(-30, 30)),
                bool(rng.random() < 0.5),
                0.0,
                (float(rng.uniform(0.12, 0.88) * size), float(rng.uniform(0.12, 0.88) * size)),
            )
            _composite(canvas, _place(sprite, pose, base_side, rng), pose.centre)
    pose = _sample_pose(rng, scene, size)
    footprint = _composite(canvas, _place(target, pose, base_side, rng), pose.centre)
    # Lighting: global exposure and a slight colour cast, so colour alone is an unreliable cue.
    canvas *= rng.uniform(0.82, 1.15) * (1 + rng.uniform(-0.05, 0.05, 3))
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
    return image, footprint > 0.5


def _prepare(out_dir: Path) -> None:
    """Refuse to write into a non-empty folder that is not an earlier toy benchmark; clear an earlier one."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "pods_info.json").is_file():
            raise DatasetError(f"{out_dir}: exists, is not empty and holds no toy benchmark; pick an empty --out")
        for name in _FOLDERS:
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def make_toy(
    out_dir: str | Path,
    *,
    seed: int = 0,
    categories: Sequence[str] = TOY_CATEGORIES,
    val_per_category: int = 2,
    test_per_category: int = 3,
    train_per_instance: int = 3,
    test_per_split: int = 4,
    dense_per_instance: int = 2,
    size: int = 224,
) -> Path:
    """Write the toy benchmark in the PODS layout under ``out_dir`` and return it."""
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise DatasetError(f"toy categories {unknown} unknown; choose from {sorted(CATEGORIES)}")
    if size < 32 or min(val_per_category, test_per_category, test_per_split, dense_per_instance) < 0:
        raise DatasetError("make_toy: size must be >= 32 and the counts >= 0")
    if not 1 <= train_per_instance <= 50 or val_per_category + test_per_category < 2:
        raise DatasetError("make_toy: give 1-50 train images and at least 2 instances per category")
    out_dir = Path(out_dir)
    _prepare(out_dir)
    base_side = round(0.6 * size)
    instances: dict[str, tuple[int, int, str, str]] = {}  # id -> (category index, j, category, split)
    sprites: dict[str, Image.Image] = {}
    for ci, category in enumerate(categories):
        count = val_per_category + test_per_category
        for j, look in enumerate(make_looks(category, count, np.random.default_rng([seed, ci]))):
            instance = f"{category}_{j:02d}"
            instances[instance] = (ci, j, category, "val" if j < val_per_category else "test")
            # Drawn at twice the size and reduced once: smooth edges, and cheap per-image resampling after.
            sprite = render_sprite(look, 2 * base_side)
            sprites[instance] = sprite.resize((base_side, base_side), Image.Resampling.LANCZOS)

    annos: dict[str, dict] = {}
    counts = {
        "train": train_per_instance,
        **dict.fromkeys(TEST_SPLITS, test_per_split),
        "test_dense": dense_per_instance,
    }
    for instance, (ci, j, category, _split) in instances.items():
        same = [sprites[i] for i, v in instances.items() if v[2] == category and i != instance]
        other = [sprites[i] for i, v in instances.items() if v[2] != category]
        for si, scene in enumerate(SCENES):
            folder = {"train": "train", "test_dense": "test_dense"}.get(scene, "test")
            for k in range(counts[scene]):
                rng = np.random.default_rng([seed, ci, j, si, k])
                image, mask = render_scene(rng, scene, size, sprites[instance], same, other or same)
                stem = f"{k:03d}" if scene == "train" else f"{scene}_{k:03d}"
                for sub, item, ext in ((folder, image, "jpg"), (f"{folder}_masks", mask, "png")):
                    path = out_dir / sub / instance / f"{stem}.{ext}"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if ext == "jpg":
                        item.save(path, format="JPEG", quality=92)
                    else:
                        Image.fromarray(item.astype(np.uint8) * 255, mode="L").save(path, format="PNG")
                if folder == "test":
                    annos[f"test/{instance}/{stem}.jpg"] = {"class": instance, "split": "test", "test_split": scene}

    classes = sorted(instances)
    info = {
        "classes": classes,
        "class_to_idx": {c: i for i, c in enumerate(classes)},
        "class_to_sc": {c: instances[c][2] for c in classes},
        "class_to_split": {c: instances[c][3] for c in classes},
    }
    (out_dir / "pods_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    (out_dir / "pods_image_annos.json").write_text(json.dumps(annos, indent=2, sort_keys=True))
    return out_dir
