"""Patch-similarity mask and box prediction: the detector/segmenter shared by the detection and segmentation tasks.

Inputs are dense features: for each image an (h, w, C) grid of L2-normalized patch features (``encoder.dense``),
computed from the whole image resized to a square, so grid cell (i, j) covers pixel rows ``[i H/h, (i+1) H/h)``
and columns ``[j W/w, (j+1) W/w)`` of the original (H, W) image.

1. Reference vector from the first train image: ``r = 0.5 max_p f_p + 0.5 mean_p f_p`` over the patches p inside
   its mask, then L2-normalized. ``max`` is the per-dimension max (a vector, not the max-norm patch): it keeps the
   strongest response of every channel anywhere on the object, the mean keeps the typical patch.
2. Cosine map ``s_ij = <f_ij, r>`` on the test grid, bilinearly upsampled to (H, W), min-max normalized.
3. Otsu threshold -> foreground; remove objects under ``min_object_pixels``; binary closing; keep the largest
   connected component = the predicted mask; its extent = the box.
4. Confidence = ``max_k cos(mean of test patches in the box, mean of train-k patches in train-k's mask box)``.

Mask -> grid: a cell is inside when at least half of its pixels are (area average). A mask too small to fill
half of any cell falls back to the single cell nearest its centroid, so a tiny object still gets a vector.
A box -> grid: the cells whose centres lie in the box, else the cell holding the box centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.measure import label
from skimage.morphology import closing, disk, remove_small_objects


@dataclass(frozen=True)
class DensePrediction:
    """One detection: a boolean (H, W) mask, its COCO box (x, y, width, height) in pixels, and a confidence."""

    image_id: str
    mask: np.ndarray
    box: tuple[float, float, float, float]
    score: float


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def downsample_mask(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask -> (h, w) bool grid: a cell is in when >= half its area is; never empty if mask isn't."""
    mask = np.asarray(mask, dtype=bool)
    h, w = grid_hw
    # PIL's BOX filter is an exact area average over each cell's pixel footprint.
    fraction = np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((w, h), Image.BOX))
    cells = fraction >= 0.5
    if not cells.any() and mask.any():
        rows, cols = np.nonzero(mask)
        i = min(int(rows.mean() * h / mask.shape[0]), h - 1)
        j = min(int(cols.mean() * w / mask.shape[1]), w - 1)
        cells[i, j] = True
    return cells


def box_cells(
    box: tuple[float, float, float, float], image_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> np.ndarray:
    """(h, w) bool: grid cells whose centres lie in the COCO box (x, y, bw, bh); else the cell at its centre."""
    (height, width), (h, w) = image_hw, grid_hw
    x, y, bw, bh = box
    centre_y = (np.arange(h) + 0.5) * height / h
    centre_x = (np.arange(w) + 0.5) * width / w
    inside_y = (centre_y >= y) & (centre_y <= y + bh)
    inside_x = (centre_x >= x) & (centre_x <= x + bw)
    cells = inside_y[:, None] & inside_x[None, :]
    if not cells.any():
        i = min(int((y + bh / 2) * h / height), h - 1)
        j = min(int((x + bw / 2) * w / width), w - 1)
        cells[i, j] = True
    return cells


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """COCO box (x, y, width, height) of the pixel extent of a non-empty bool mask."""
    rows, cols = np.nonzero(mask)
    return (
        float(cols.min()),
        float(rows.min()),
        float(cols.max() - cols.min() + 1),
        float(rows.max() - rows.min() + 1),
    )


def compute_reference_vector(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C,) unit vector ``0.5 max + 0.5 mean`` (per dimension) of the (h, w, C) features inside the mask."""
    if not np.asarray(mask).any():
        raise ValueError("the first train image's mask is empty; the reference vector needs object pixels")
    inside = features[downsample_mask(mask, features.shape[:2])]  # (n, C)
    return _unit(0.5 * inside.max(axis=0) + 0.5 * inside.mean(axis=0))


def compute_similarity_map(features: np.ndarray, reference: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) float cosine map of the (h, w, C) features to the reference, bilinearly upsampled, min-max in [0, 1].

    A constant map (no contrast) comes back as all zeros.
    """
    height, width = image_hw
    cosine = (features @ reference).astype(np.float32)  # (h, w)
    upsampled = np.asarray(Image.fromarray(cosine, mode="F").resize((width, height), Image.BILINEAR))
    low, high = float(upsampled.min()), float(upsampled.max())
    if high - low < 1e-8:
        return np.zeros((height, width), dtype=np.float32)
    return (upsampled - low) / (high - low)


def segment_similarity(similarity: np.ndarray, min_object_pixels: int = 100) -> np.ndarray | None:
    """(H, W) bool mask of the largest component after Otsu, small-object removal and closing; None if empty.

    The closing disk has radius ~1% of the short side (at least 1 px): it bridges thin gaps in the upsampled
    map without merging separate objects.
    """
    if float(similarity.max()) - float(similarity.min()) < 1e-8:
        return None
    foreground = similarity > threshold_otsu(similarity)
    if min_object_pixels > 1:
        foreground = remove_small_objects(foreground, max_size=min_object_pixels - 1)
    foreground = closing(foreground, disk(max(1, round(min(similarity.shape) / 100))))
    components = label(foreground, connectivity=2)
    if components.max() == 0:
        return None
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def compute_train_box_means(train_features: list[np.ndarray], train_masks: list[np.ndarray]) -> np.ndarray:
    """(k, C) unit mean feature of each train grid (h, w, C) inside the box of its (H, W) mask (empty masks skipped)."""
    means = []
    for features, mask in zip(train_features, train_masks, strict=True):
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            cells = box_cells(mask_box(mask), mask.shape, features.shape[:2])
            means.append(_unit(features[cells].mean(axis=0)))
    if not means:
        raise ValueError("every train mask is empty; the detection confidence needs at least one object box")
    return np.stack(means)


def compute_instance_templates(
    train_features: list[np.ndarray], train_masks: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """What the predictor needs from an instance's train images: (reference (C,), train box means (k, C))."""
    return compute_reference_vector(train_features[0], train_masks[0]), compute_train_box_means(
        train_features, train_masks
    )


def compute_confidence(
    test_features: np.ndarray,
    box: tuple[float, float, float, float],
    image_hw: tuple[int, int],
    train_box_means: np.ndarray,
) -> float:
    """max_k cos(mean test feature in ``box``, train box mean k)."""
    test_vector = _unit(test_features[box_cells(box, image_hw, test_features.shape[:2])].mean(axis=0))
    return float((train_box_means @ test_vector).max())


def predict_instance(
    image_id: str,
    test_features: np.ndarray,
    image_hw: tuple[int, int],
    reference: np.ndarray,
    train_box_means: np.ndarray,
    *,
    min_object_pixels: int = 100,
) -> DensePrediction | None:
    """The mask, box and confidence of the instance in one test image, or None when nothing is segmented.

    ``test_features``: (h, w, C) grid of the test image, whose original size is ``image_hw`` = (H, W);
    ``reference``, ``train_box_means``: from :func:`compute_instance_templates`.
    """
    mask = segment_similarity(compute_similarity_map(test_features, reference, image_hw), min_object_pixels)
    if mask is None:
        return None
    box = mask_box(mask)
    score = compute_confidence(test_features, box, image_hw, train_box_means)
    return DensePrediction(image_id=image_id, mask=mask, box=box, score=score)
