"""Finding the object in a generated image, so the filter compares object crops, not whole scenes.

Maskers share one interface: ``fit(real_images, real_masks)`` learns the object from the instance's real photos,
``boxes(images)`` returns one pixel box ``(x0, y0, x1, y1)`` (end-exclusive) per image.

- ``NoMasker``: the whole image.
- ``PatchMasker``: PerSAM's location prior without SAM. Reference r = mean of the L2-normalized patch features
  inside the real masks; per image, s_ij = <f_ij, r> over the (h, w) patch grid, min-max normalized to [0, 1];
  the box is the extent of the largest connected region with s >= threshold.
- ``SamMasker``: SAM (transformers ``SamModel``) prompted with the most similar patch's centre (PerSAM-style);
  the box of its best mask, falling back to the patch box when SAM returns nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from personalization.errors import UserError

Box = tuple[int, int, int, int]


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
    """SAM prompted with the peak of the patch-similarity map (PerSAM's positive point)."""

    def __init__(self, patch_masker: PatchMasker, sam_weights: str, device: str | None = None):
        from transformers import SamModel, SamProcessor

        self.patch_masker = patch_masker
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = SamModel.from_pretrained(sam_weights).to(self.device).eval()
        self.processor = SamProcessor.from_pretrained(sam_weights)

    def fit(self, images: Sequence[Image.Image], masks: Sequence[np.ndarray]) -> SamMasker:
        self.patch_masker.fit(images, masks)
        return self

    @torch.inference_mode()
    def boxes(self, images: Sequence[Image.Image]) -> list[Box]:
        sims = self.patch_masker.similarity(images)
        fallback = self.patch_masker.boxes(images)
        out = []
        for image, sim, backup in zip(images, sims, fallback, strict=True):
            h, w = sim.shape
            row, col = divmod(int(sim.argmax()), w)
            point = [[[(col + 0.5) * image.width / w, (row + 0.5) * image.height / h]]]
            inputs = self.processor(images=image, input_points=point, return_tensors="pt").to(self.device)
            result = self.model(**inputs)
            masks = self.processor.post_process_masks(
                result.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
            )[0][0]  # (3, H, W): SAM's three candidate masks for the point
            best = int(result.iou_scores[0, 0].argmax())
            box = mask_box(masks[best].numpy())
            out.append(box or backup)
        return out


def build_masker(kind: str, embedder, sam_weights: str = "", device: str | None = None, threshold: float = 0.5):
    if kind == "none":
        return NoMasker()
    if kind == "patch":
        return PatchMasker(embedder, threshold)
    if kind == "sam":
        if not sam_weights:
            raise UserError("filter.masker=sam needs filter.sam_weights (HF id or local SAM folder)")
        return SamMasker(PatchMasker(embedder, threshold), sam_weights, device)
    raise UserError(f"filter.masker={kind!r}: use none, patch or sam")
