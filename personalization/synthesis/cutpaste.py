"""Cut-and-Paste positives: the masked real object pasted onto a background at a random scale and place.

Scale convention: ``scale`` sets the pasted object's longest side (after flip and rotation) to
``round(scale * BASE_FRACTION * size)`` pixels on a ``size`` x ``size`` canvas, so the paper's 0.3-1.3 range
gives objects from 15% to 65% of the canvas side; it is clamped to ``MAX_FRACTION * size`` so the object always
fits, and the object is placed wholly inside the canvas.

Compositing: ``alpha = max(mask, blur(mask))``, a 1-px outward feather, so pixels under the returned mask are
exactly the (resized) object's pixels and only a thin ring outside it blends with the background.

One composite draws everything random (source photo, background and its crop, scale, position, flip, rotation,
photometric jitter) from its own generator seeded by ``(seed, instance_id, k)``: composite k is the same
whether it is made alone or among others, in any order, on any worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from personalization.schema import decode_image, decode_mask, make_image_id, make_row

BASE_FRACTION = 0.5  # scale 1.0 = object's longest side is half the canvas side
MAX_FRACTION = 0.95
MAX_ANGLE = 15.0  # degrees of random in-plane rotation, either way
JITTER = 0.15  # brightness and contrast factors drawn from [1 - JITTER, 1 + JITTER]


def fit_background(background: Image.Image, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Resize ``background`` to cover a (size, size) square, then crop it: centred, or at a random place."""
    width, height = background.size
    factor = size / min(width, height)
    new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
    resized = background.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    if rng is None:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = int(rng.integers(0, new_w - size + 1)), int(rng.integers(0, new_h - size + 1))
    return resized.crop((left, top, left + size, top + size))


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def compute_object_side(scale: float, size: int) -> int:
    """Pixels of the pasted object's longest side: ``round(scale * BASE_FRACTION * size)``, clamped to fit."""
    return int(np.clip(round(scale * BASE_FRACTION * size), 2, int(MAX_FRACTION * size)))


def paste_object(
    image: Image.Image,
    mask: np.ndarray,
    background: Image.Image,
    *,
    scale: float,
    position: tuple[int, int] | np.random.Generator,
    angle: float = 0.0,
    flip: bool = False,
    size: int,
) -> tuple[Image.Image, np.ndarray]:
    """Paste the object ``image[mask]`` onto ``background``; returns (composite (size, size) RGB, bool mask).

    ``mask`` is bool (H, W) matching ``image``. The object is cropped to its mask box, mirrored if ``flip``,
    rotated by ``angle`` degrees (counter-clockwise), resized so its longest side is ``compute_object_side``,
    and placed with its box's top-left corner at ``position`` = (x, y) (clipped so it stays inside the canvas),
    or at a uniform random place when ``position`` is a numpy Generator. ``background`` is fitted to the
    canvas by a centred cover-crop (use :func:`fit_background` first for a random crop).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask is {mask.shape}, image is {(image.height, image.width)}; they must match")
    if not mask.any():
        raise ValueError("the object mask is empty: nothing to paste")
    box = _bounding_box(mask)
    obj = image.convert("RGB").crop(box)
    alpha = Image.fromarray(mask[box[1] : box[3], box[0] : box[2]].astype(np.uint8) * 255)
    if flip:
        obj, alpha = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT), alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if angle:
        # Corners uncovered by the rotation take the object's mean colour, so the feather ring never darkens.
        fill = tuple(int(c) for c in np.asarray(obj)[np.asarray(alpha) > 0].mean(axis=0))
        obj = obj.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=fill)
        alpha = alpha.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        inner = _bounding_box(np.asarray(alpha) > 127) if (np.asarray(alpha) > 127).any() else (0, 0, *alpha.size)
        obj, alpha = obj.crop(inner), alpha.crop(inner)
    side = compute_object_side(scale, size)
    factor = side / max(obj.size)
    new_size = (max(1, round(obj.width * factor)), max(1, round(obj.height * factor)))
    obj = obj.resize(new_size, Image.Resampling.LANCZOS)
    hard = np.asarray(alpha.resize(new_size, Image.Resampling.BILINEAR)) > 127
    if not hard.any():  # a sliver that bilinear resizing thinned away: keep its nearest-neighbour trace
        hard = np.asarray(alpha.resize(new_size, Image.Resampling.NEAREST)) > 127
    w, h = new_size
    if isinstance(position, np.random.Generator):
        x, y = int(position.integers(0, size - w + 1)), int(position.integers(0, size - h + 1))
    else:
        x, y = int(np.clip(position[0], 0, size - w)), int(np.clip(position[1], 0, size - h))

    canvas = np.asarray(fit_background(background, size), dtype=np.float32)
    pasted = np.zeros((size, size), dtype=bool)
    pasted[y : y + h, x : x + w] = hard
    source = canvas.copy()  # outside the object's box the "object" layer is the background: no dark halo
    source[y : y + h, x : x + w] = np.asarray(obj, dtype=np.float32)
    feather = np.asarray(Image.fromarray(pasted.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(1)))
    weight = np.maximum(feather.astype(np.float32) / 255.0, pasted)[..., None]
    composite = np.rint(weight * source + (1.0 - weight) * canvas).astype(np.uint8)
    return Image.fromarray(composite), pasted


def composite_seed(seed: int, instance_id: str, k: int) -> int:
    """The seed of composite ``k`` of an instance: a stable 63-bit hash of (seed, instance_id, k)."""
    return int(make_image_id("cutpaste-seed", seed, instance_id, k), 16) >> 1


def _jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Small brightness and contrast change, so copies of the same 3 photos are not pixel-identical."""
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(1 - JITTER, 1 + JITTER))


def make_composite(
    real_rows: Sequence[dict],
    backgrounds: Sequence[Image.Image],
    *,
    k: int,
    seed: int,
    scale_range: tuple[float, float],
    size: int,
    backgrounds_key: str = "",
) -> dict:
    """Composite number ``k`` of the one instance whose masked real rows are ``real_rows``: an image-table row.

    ``backgrounds_key`` names the background set (e.g. its folder or procedural seed); it enters the image id.
    """
    masked = [row for row in real_rows if row.get("mask") is not None]
    if not masked:
        raise ValueError("cut-and-paste needs real rows with object masks; none of the given rows has one")
    first = masked[0]
    instance_id = first["instance_id"]
    row_seed = composite_seed(seed, instance_id, k)
    rng = np.random.default_rng(row_seed)
    # Fixed draw order keeps composite k stable: photo, background, crop, jitter, scale, flip, angle, place.
    source = masked[int(rng.integers(len(masked)))]
    background = fit_background(backgrounds[int(rng.integers(len(backgrounds)))], size, rng)
    photo = _jitter(decode_image(source["image"]), rng)
    scale = float(rng.uniform(*scale_range))
    flip = bool(rng.random() < 0.5)
    angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    composite, pasted = paste_object(
        photo, decode_mask(source["mask"]), background, scale=scale, position=rng, angle=angle, flip=flip, size=size
    )
    lo, hi = scale_range
    return make_row(
        image_id=make_image_id("cutpaste", instance_id, k, seed, size, lo, hi, backgrounds_key),
        instance_id=instance_id,
        category=first["category"],
        role="positive",
        source="cutpaste",
        split="",
        instance_split=first["instance_split"],
        image=composite,
        mask=pasted,
        seed=row_seed,
        generator="cutpaste",
    )


def make_composites(
    real_rows: Sequence[dict],
    backgrounds: Sequence[Image.Image],
    *,
    n: int,
    seed: int,
    scale_range: tuple[float, float],
    size: int,
    backgrounds_key: str = "",
) -> list[dict]:
    """``n`` composites for each instance among ``real_rows`` (image-table rows; only masked ones are used).

    Rows: role "positive", source and generator "cutpaste", split "", ``seed`` = the composite's own seed,
    ``mask`` = the pasted mask; ``image_id`` hashes (instance, k, seed, size, scale range, background set).
    """
    if not backgrounds:
        raise ValueError("cut-and-paste needs at least one background")
    by_instance: dict[str, list[dict]] = {}
    for row in real_rows:
        by_instance.setdefault(row["instance_id"], []).append(row)
    rows = []
    for instance_id in sorted(by_instance):
        if not any(row.get("mask") is not None for row in by_instance[instance_id]):
            raise ValueError(f"instance {instance_id} has no masked real image; cut-and-paste needs object masks")
        for k in range(n):
            rows.append(
                make_composite(
                    by_instance[instance_id],
                    backgrounds,
                    k=k,
                    seed=seed,
                    scale_range=scale_range,
                    size=size,
                    backgrounds_key=backgrounds_key,
                )
            )
    return rows
