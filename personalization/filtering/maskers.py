"""Finding the object in a generated image, so the filter compares object crops, not whole scenes.

Maskers share one interface: ``fit(real_images, real_masks)`` learns the object from the instance's real photos,
``boxes(images)`` returns one pixel box ``(x0, y0, x1, y1)`` (end-exclusive) per image.

- ``NoMasker``: the whole image.
- ``PatchMasker``: PerSAM's location prior without SAM. Reference r = mean of the L2-normalized patch features
  inside the real masks; per image, s_ij = <f_ij, r> over the (h, w) patch grid, min-max normalized to [0, 1];
  the box is the extent of the largest connected region with s >= threshold.
- ``SamMasker``: SAM (transformers ``SamModel``) prompted PerSAM-style with the most similar patch's centre as a
  positive point and the least similar one's as a negative point; ``masks(images)`` gives SAM's best mask (by its
  predicted IoU) per image, and the box is that mask's extent, falling back to the patch box when SAM returns an
  empty mask.

``filter.masker=auto`` (the default) is the paper's: SAM where ``filter.sam_weights`` names weights, else the patch
shortcut, which :func:`resolve_masker` announces in the log as a fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from personalization.devices import pick_device
from personalization.errors import UserError

Box = tuple[int, int, int, int]
log = logging.getLogger(__name__)


def mask_box(mask: np.ndarray) -> Box | None:
    """Bool (H, W) mask -> its extent ``(x0, y0, x1, y1)``, end-exclusive; None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_box(image: Image.Image, box: Box | None) -> Image.Image:
    return image if box is None else image.crop(box)


class NoMasker:
    def fit(self, images: Sequence[Image.Image], masks: Sequence[np.ndarray]) -> NoMasker:
        return self

    def boxes(self, images: Sequence[Image.Image]) -> list[Box]:
        return [(0, 0, image.width, image.height) for image in images]


def _grid_fraction(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch cell covered by the mask: (h, w) in [0, 1]."""
    small = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).resize(grid[::-1], Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


class PatchMasker:
    """Patch-similarity localisation on an embedder's ``patch_features`` (N, h, w, C)."""

    def __init__(self, embedder, threshold: float = 0.5):
        self.embedder = embedder
        self.threshold = threshold
        self.reference: torch.Tensor | None = None

    def fit(self, images: Sequence[Image.Image], masks: Sequence[np.ndarray]) -> PatchMasker:
        feats = self.embedder.patch_features(images)  # (N, h, w, C)
        picked = []
        for feat, mask in zip(feats, masks, strict=True):
            cover = torch.from_numpy(_grid_fraction(mask, feat.shape[:2]))
            keep = cover >= 0.5
            if not keep.any():  # tiny object: the best-covered cell stands for it
                keep = cover == cover.max()
            picked.append(feat[keep])
        self.reference = torch.nn.functional.normalize(torch.cat(picked).mean(0), dim=0)
        return self

    def similarity(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, h, w) similarity to the reference, min-max normalized per image to [0, 1]."""
        if self.reference is None:
            raise RuntimeError("PatchMasker.fit(real_images, real_masks) must run before boxes()")
        sim = self.embedder.patch_features(images) @ self.reference.to(self.embedder.device)
        low = sim.amin(dim=(1, 2), keepdim=True)
        high = sim.amax(dim=(1, 2), keepdim=True)
        return ((sim - low) / (high - low).clamp_min(1e-8)).cpu()

    def boxes(self, images: Sequence[Image.Image]) -> list[Box]:
        from skimage.measure import label

        out = []
        for image, sim in zip(images, self.similarity(images), strict=True):
            regions = label((sim >= self.threshold).numpy(), connectivity=1)
            sizes = np.bincount(regions.ravel())
            sizes[0] = 0
            cells = regions == sizes.argmax()
            h, w = cells.shape
            x0, y0, x1, y1 = mask_box(cells)
            sx, sy = image.width / w, image.height / h
            out.append((int(x0 * sx), int(y0 * sy), int(np.ceil(x1 * sx)), int(np.ceil(y1 * sy))))
        return out


class SamMasker:
    """SAM prompted with the peak (positive point) and the trough (negative point) of the patch-similarity map, as
    PerSAM's location prior does; ``sam_weights`` is an HF id or a local folder, loaded with ``from_pretrained``."""

    def __init__(self, patch_masker: PatchMasker, sam_weights: str, device: str | None = None):
        from transformers import SamModel, SamProcessor

        self.patch_masker = patch_masker
        self.device = pick_device(device)
        try:
            self.model = SamModel.from_pretrained(sam_weights).to(self.device).eval()
            self.processor = SamProcessor.from_pretrained(sam_weights)
        except OSError as error:
            raise UserError(
                f"filter.sam_weights={sam_weights!r}: no SAM checkpoint there ({error}); give a local folder holding "
                "config.json, model.safetensors and preprocessor_config.json (a facebook/sam-vit-* download), an HF "
                "id in this node's HF_HOME cache, or set filter.masker=patch"
            ) from error

    def fit(self, images: Sequence[Image.Image], masks: Sequence[np.ndarray]) -> SamMasker:
        self.patch_masker.fit(images, masks)
        return self

    def _points(self, images: Sequence[Image.Image]) -> list[list[list[float]]]:
        """Per image [positive (x, y), negative (x, y)]: the centres of the most and least similar patches."""
        out = []
        for image, sim in zip(images, self.patch_masker.similarity(images), strict=True):
            h, w = sim.shape
            cells = [divmod(int(sim.argmax()), w), divmod(int(sim.argmin()), w)]
            out.append([[(col + 0.5) * image.width / w, (row + 0.5) * image.height / h] for row, col in cells])
        return out

    @torch.inference_mode()
    def masks(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """SAM's best mask per image: bool (H, W) at the image's own size (may be empty)."""
        if not images:
            return []
        points = self._points(images)
        inputs = self.processor(
            images=[image.convert("RGB") for image in images],
            input_points=[[pair] for pair in points],  # (N, 1 prompt, 2 points, xy)
            input_labels=[[[1, 0]] for _ in points],  # positive, negative
            return_tensors="pt",
        ).to(self.device)
        result = self.model(**inputs)
        candidates = self.processor.post_process_masks(
            result.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )  # per image (1, 3, H, W): SAM's three candidate masks for the prompt
        best = result.iou_scores[:, 0].argmax(dim=-1).cpu()
        return [cand[0, int(k)].numpy().astype(bool) for cand, k in zip(candidates, best, strict=True)]

    def boxes(self, images: Sequence[Image.Image]) -> list[Box]:
        fallback = self.patch_masker.boxes(images)
        return [mask_box(mask) or backup for mask, backup in zip(self.masks(images), fallback, strict=True)]


def resolve_masker(kind: str, sam_weights: str = "") -> str:
    """``auto`` -> ``sam`` when SAM weights are configured, else ``patch`` (logged as the fallback it is)."""
    if kind != "auto":
        return kind
    if sam_weights:
        return "sam"
    log.warning(
        "filter.masker=auto: no filter.sam_weights, so the filter finds objects with the patch-similarity shortcut "
        "(fallback masker=patch); the paper uses PerSAM: set filter.sam_weights=facebook/sam-vit-base or a local SAM "
        "folder"
    )
    return "patch"


def build_masker(kind: str, embedder, sam_weights: str = "", device: str | None = None, threshold: float = 0.5):
    """The masker named by ``filter.masker`` (none, patch, sam or auto; see :func:`resolve_masker`)."""
    kind = resolve_masker(kind, sam_weights)
    if kind == "none":
        return NoMasker()
    if kind == "patch":
        return PatchMasker(embedder, threshold)
    if kind == "sam":
        if not sam_weights:
            raise UserError("filter.masker=sam needs filter.sam_weights (HF id or local SAM folder)")
        return SamMasker(PatchMasker(embedder, threshold), sam_weights, device)
    raise UserError(f"filter.masker={kind!r}: use auto, none, patch or sam")
