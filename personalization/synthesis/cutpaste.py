"""Cut-and-Paste positives: the masked real object pasted onto a background at a random scale and place.

Scale conventions (``scale_of``), on a ``size`` x ``size`` canvas:

- ``object`` (the paper's, default): ``scale`` multiplies the object's own size. The photo counts as fitted to
  the canvas the way backgrounds are (its shorter side = ``size``), so at scale 1 the object is as large on the
  canvas as in its photo; every side is multiplied by ``scale`` and its area by ``scale**2``.
- ``canvas`` (before issue 14): ``scale`` sets the pasted object's longest side (after flip and rotation) to
  ``round(scale * BASE_FRACTION * size)`` pixels, so 0.3-1.3 gives objects from 15% to 65% of the canvas side.

Either way an object that would not fit shrinks until its longest side is ``MAX_FRACTION * size``, and the object
is placed wholly inside the canvas at a uniform random position.

Compositing: ``alpha = max(mask, blur(mask))``, a 1-px outward feather, so pixels under the returned mask are
exactly the (resized) object's pixels and only a thin ring outside it blends with the background.

Extra augmentations (``extra_augment``, not in the paper; off by default): a random horizontal flip, an in-plane
rotation of up to ``MAX_ANGLE`` degrees and a brightness / contrast jitter of ``JITTER``.

One composite draws everything random (source photo, background and its crop, scale, position, and with
``extra_augment`` the jitter, flip and rotation) from its own generator seeded by ``(seed, instance_id, k)``:
composite k is the same whether it is made alone or among others, in any order, on any worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from personalization.schema import decode_image, decode_mask, make_image_id, make_row

BASE_FRACTION = 0.5  # scale 1.0 = object's longest side is half the canvas side
MAX_FRACTION = 0.95
MAX_ANGLE = 15.0  # degrees of random in-plane rotation, either way
JITTER = 0.15  # brightness and contrast factors drawn from [1 - JITTER, 1 + JITTER]
ScaleOf = Literal["object", "canvas"]


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
    """``scale_of="canvas"``: pixels of the pasted object's longest side, ``round(scale * BASE_FRACTION * size)``,
    clamped to fit."""
    return int(np.clip(round(scale * BASE_FRACTION * size), 2, int(MAX_FRACTION * size)))


def compute_pasted_size(
    obj_size: tuple[int, int], photo_size: tuple[int, int], scale: float, size: int, scale_of: ScaleOf
) -> tuple[int, int]:
    """(width, height) of the pasted object whose crop is ``obj_size`` pixels in a ``photo_size`` photo."""
    if scale_of == "object":
        factor = scale * size / min(photo_size)
    elif scale_of == "canvas":
        factor = compute_object_side(scale, size) / max(obj_size)
    else:
        raise ValueError(f"scale_of={scale_of!r}: use object or canvas")
    factor = min(factor, MAX_FRACTION * size / max(obj_size))  # too large to fit: shrink to fit
    return max(1, round(obj_size[0] * factor)), max(1, round(obj_size[1] * factor))


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
    scale_of: ScaleOf = "object",
) -> tuple[Image.Image, np.ndarray]:
    """Paste the object ``image[mask]`` onto ``background``; returns (composite (size, size) RGB, bool mask).

    ``mask`` is bool (H, W) matching ``image``. The object is cropped to its mask box, mirrored if ``flip``,
    rotated by ``angle`` degrees (counter-clockwise), resized by ``scale`` (:func:`compute_pasted_size`, see
    ``scale_of`` in the module docstring), and placed with its box's top-left corner at ``position`` = (x, y)
    (clipped so it stays inside the canvas), or at a uniform random place when ``position`` is a numpy Generator.
    ``background`` is fitted to the canvas by a centred cover-crop (use :func:`fit_background` first for a random
    crop).
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
    new_size = compute_pasted_size(obj.size, image.size, scale, size, scale_of)
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
    scale_of: ScaleOf = "object",
    extra_augment: bool = False,
) -> dict:
    """Composite number ``k`` of the one instance whose masked real rows are ``real_rows``: an image-table row.

    ``backgrounds_key`` names the background set (e.g. its folder or procedural seed); it enters the image id, and
    so do ``scale_of`` and ``extra_augment`` unless they are the recipe from before issue 14 (canvas, true), whose
    composites keep their ids and pixels.
    """
    masked = [row for row in real_rows if row.get("mask") is not None]
    if not masked:
        raise ValueError("cut-and-paste needs real rows with object masks; none of the given rows has one")
    first = masked[0]
    instance_id = first["instance_id"]
    row_seed = composite_seed(seed, instance_id, k)
    rng = np.random.default_rng(row_seed)
    # Fixed draw order keeps composite k stable: photo, background, crop, [jitter], scale, [flip, angle], place.
    source = masked[int(rng.integers(len(masked)))]
    background = fit_background(backgrounds[int(rng.integers(len(backgrounds)))], size, rng)
    photo = decode_image(source["image"])
    photo = _jitter(photo, rng) if extra_augment else photo
    scale = float(rng.uniform(*scale_range))
    flip = bool(rng.random() < 0.5) if extra_augment else False
    angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)) if extra_augment else 0.0
    composite, pasted = paste_object(
        photo, decode_mask(source["mask"]), background, scale=scale, position=rng, angle=angle, flip=flip,
        size=size, scale_of=scale_of,
    )  # fmt: skip
    lo, hi = scale_range
    recipe = () if (scale_of, extra_augment) == ("canvas", True) else (scale_of, extra_augment)
    return make_row(
        image_id=make_image_id("cutpaste", instance_id, k, seed, size, lo, hi, backgrounds_key, *recipe),
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
    scale_of: ScaleOf = "object",
    extra_augment: bool = False,
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
                    scale_of=scale_of,
                    extra_augment=extra_augment,
                )
            )
    return rows


def composite_options(cutpaste_cfg) -> dict:
    """The keyword arguments of :func:`make_composite` that the ``cutpaste`` config section sets."""
    return {
        "scale_range": (cutpaste_cfg.scale_min, cutpaste_cfg.scale_max),
        "size": cutpaste_cfg.image_size,
        "scale_of": cutpaste_cfg.scale_of,
        "extra_augment": cutpaste_cfg.extra_augment,
    }
