"""Object masks for photos that come without one: OpenCV GrabCut started from a box.

A user's own folder of photos may lack ``masks/`` (or a mask for some photos). Cut-and-Paste and the dense
evaluation need the object's mask, so ingest derives one here: GrabCut (a colour-model graph cut, no learned
weights, so it runs offline on any machine) is told that everything outside a box is background and segments the
inside. The box is the user's, from ``boxes.json`` beside the photos (``{"<file stem>": [x0, y0, x1, y1]}``,
pixels of the photo as shown, EXIF rotation applied), or else a central box with a ``CENTER_MARGIN`` border: most
photos of one object frame it in the middle.

Derived masks are guesses: ingest logs which photos got one and the report shows them for the user to check. A
user's mask always wins. When GrabCut finds nothing usable (an empty or near-full result), the box itself is the
mask, and :attr:`DerivedMask.fallback` says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from personalization.errors import UserError

BOXES_FILE = "boxes.json"
CENTER_MARGIN = 0.08  # the central box leaves this fraction of each side as sure background
WORK_SIDE = 512  # GrabCut runs on the photo downscaled to this longer side (seconds, not minutes, per photo)
ITERATIONS = 5
MIN_FRACTION, MAX_FRACTION = 0.01, 0.98  # of the box area: outside this, GrabCut is taken to have failed

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class DerivedMask:
    """A derived (H, W) boolean mask, the box it started from, where that box came from, and whether GrabCut
    failed so the box itself was used."""

    mask: np.ndarray
    box: Box
    box_from: str  # "center" | "boxes.json"
    fallback: bool = False


def center_box(width: int, height: int, margin: float = CENTER_MARGIN) -> Box:
    return (margin * width, margin * height, (1 - margin) * width, (1 - margin) * height)


def load_boxes(root: str | Path) -> dict[str, Box]:
    """``root/boxes.json`` as {stem: (x0, y0, x1, y1)}; {} when absent. A malformed file is a UserError."""
    path = Path(root) / BOXES_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f'{path}: not valid JSON ({error}); write {{"<photo stem>": [x0, y0, x1, y1]}}') from error
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must map photo stems to [x0, y0, x1, y1] boxes, got {type(raw).__name__}")
    boxes = {}
    for stem, box in raw.items():
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
        if not ok or not (box[0] < box[2] and box[1] < box[3]):
            raise UserError(f"{path}[{stem!r}]: {box!r} is not a box [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        boxes[str(stem)] = tuple(float(v) for v in box)
    return boxes


def _clip_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    x1, y1 = min(width, int(round(box[2]))), min(height, int(round(box[3])))
    return x0, y0, max(x0 + 1, x1), max(y0 + 1, y1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return ndimage.binary_fill_holes(mask)
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def segment_object(image: Image.Image, box: Box | None = None, *, seed: int = 0) -> DerivedMask:
    """GrabCut of ``image`` from ``box`` (pixels; None = the central box) -> a :class:`DerivedMask` of the image's
    size, kept to its largest connected part with holes filled."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    box_from = "center" if box is None else BOXES_FILE
    box = center_box(width, height) if box is None else box
    scale = min(1.0, WORK_SIDE / max(width, height))
    small = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = _clip_box(tuple(v * scale for v in box), small.shape[1], small.shape[0])
    labels = np.zeros(small.shape[:2], np.uint8)
    cv2.setRNGSeed(seed)  # GrabCut's colour models start from k-means: seeded, the mask is reproducible
    if x1 - x0 >= 2 and y1 - y0 >= 2:
        cv2.grabCut(
            cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
            labels,
            (x0, y0, x1 - x0, y1 - y0),
            np.zeros((1, 65), np.float64),
            np.zeros((1, 65), np.float64),
            ITERATIONS,
            cv2.GC_INIT_WITH_RECT,
        )
    found = _largest_component(np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)))
    found = cv2.resize(found.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    bx0, by0, bx1, by1 = _clip_box(box, width, height)
    box_area = (bx1 - bx0) * (by1 - by0)
    if MIN_FRACTION * box_area <= found.sum() <= MAX_FRACTION * box_area:
        return DerivedMask(found, box, box_from)
    fallback = np.zeros((height, width), bool)
    fallback[by0:by1, bx0:bx1] = True
    return DerivedMask(fallback, box, box_from, fallback=True)


def compute_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
