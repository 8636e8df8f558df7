"""Feature extraction for evaluation: one encoder (optionally with a LoRA adapter), loaded once, applied to batches.

A plain class with no Ray: ``pipelines/evaluate.py`` wraps it in a Ray Data actor, tests call it directly.
Batch functions, all taking PNG bytes:

- :meth:`FeatureExtractor.embed` -> (B, D) L2-normalized global features (``model.eval_feature``).
- :meth:`FeatureExtractor.dense` -> (B, h, w, C) L2-normalized patch features.
- :meth:`FeatureExtractor.templates` -> per masked train image, its candidate reference vector and box mean.
- :meth:`FeatureExtractor.predictions` / :meth:`FeatureExtractor.predict` -> for each image and each instance
  template, a mask/box/score prediction (dense features never leave the worker: a 64x64x768 grid is 12 MB per
  image, the prediction a few KB).

Dense features come from the *whole* image resized to a square ``dense_size`` (rounded down to the patch size),
not from the evaluation transform's centre crop, so grid cells map onto the full original image.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from personalization import schema
from personalization.config import build_config
from personalization.devices import pick_device
from personalization.evaluation.dense import (
    DensePrediction,
    compute_reference_vector,
    compute_train_box_means,
    predict_instance,
)


class FeatureExtractor:
    """``model``: a ModelConfig as a dict (``to_dict(cfg.model)``); ``adapter_dir``: a peft adapter folder or ""."""

    def __init__(self, model: Mapping, adapter_dir: str = "", dense_size: int = 448, device: str = ""):
        from personalization.models import BACKBONES, build_encoder, build_transform, load_adapter

        self.model_cfg = build_config({"model": dict(model)}).model
        self.device = pick_device(device)
        encoder = build_encoder(self.model_cfg)
        if adapter_dir:
            encoder = load_adapter(encoder, adapter_dir)
        self.encoder = encoder.to(self.device).eval()  # eval mode: no LoRA dropout at evaluation
        self.transform = build_transform(self.model_cfg, train=False)
        spec = BACKBONES[self.model_cfg.backbone]
        patch = int(getattr(spec, "patch_size", 0) or 0)
        self.dense_size = max(patch, dense_size - dense_size % patch) if patch else dense_size
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def _dense_pixels(self, images: Sequence[bytes]) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor, resize

        size = [self.dense_size, self.dense_size]
        tensors = [resize(pil_to_tensor(schema.decode_image(b)), size, antialias=True) for b in images]
        return ((torch.stack(tensors).float() / 255.0) - self.mean) / self.std

    @torch.no_grad()
    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        """(B, D) float32 evaluation embeddings of PNG images."""
        pixels = torch.stack([self.transform(schema.decode_image(b)) for b in images]).to(self.device)
        return self.encoder.embed(pixels, kind=self.model_cfg.eval_feature).float().cpu().numpy()

    @torch.no_grad()
    def dense(self, images: Sequence[bytes]) -> np.ndarray:
        """(B, h, w, C) float32 patch features of PNG images (whole image, square-resized)."""
        return self.encoder.dense(self._dense_pixels(images).to(self.device)).float().cpu().numpy()

    def templates(self, images: Sequence[bytes], masks: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Per masked train image: (B, C) reference vectors (0.5 max + 0.5 mean in the mask) and (B, C) box means.

        The instance's template is the reference of its first train image and the box means of all of them
        (see :func:`personalization.evaluation.dense.compute_instance_templates`); grids stay in the worker.
        """
        grids = self.dense(images)
        decoded = [schema.decode_mask(m) for m in masks]
        references = np.stack([compute_reference_vector(g, m) for g, m in zip(grids, decoded, strict=True)])
        box_means = np.concatenate([compute_train_box_means([g], [m]) for g, m in zip(grids, decoded, strict=True)])
        return references.astype(np.float32), box_means.astype(np.float32)

    def predictions(
        self,
        images: Sequence[bytes],
        image_ids: Sequence[str],
        image_hw: Sequence[tuple[int, int]],
        templates: Mapping[str, tuple[np.ndarray, np.ndarray]],
        min_object_pixels: int,
    ) -> Iterator[tuple[str, DensePrediction]]:
        """(instance_id, prediction) for every non-empty prediction of every instance template (reference, train
        box means) on every image; one batch of dense grids at a time."""
        for grid, image_id, hw in zip(self.dense(images), image_ids, image_hw, strict=True):
            for instance_id, (reference, box_means) in templates.items():
                prediction = predict_instance(
                    image_id,
                    grid,
                    tuple(int(v) for v in hw),
                    np.asarray(reference),
                    np.asarray(box_means),
                    min_object_pixels=min_object_pixels,
                )
                if prediction is not None:  # None: nothing segmented, no detection for this instance here
                    yield instance_id, prediction

    def predict(
        self,
        images: Sequence[bytes],
        image_ids: Sequence[str],
        image_hw: Sequence[tuple[int, int]],
        templates: Mapping[str, tuple[np.ndarray, np.ndarray]],
        min_object_pixels: int,
    ) -> dict[str, np.ndarray]:
        """Columns ``image_id, instance_id, mask (PNG bytes), box (N, 4) xywh, score`` of :meth:`predictions`."""
        rows: dict[str, list] = {"image_id": [], "instance_id": [], "mask": [], "box": [], "score": []}
        for instance_id, prediction in self.predictions(images, image_ids, image_hw, templates, min_object_pixels):
            rows["image_id"].append(prediction.image_id)
            rows["instance_id"].append(instance_id)
            rows["mask"].append(schema.encode_mask(prediction.mask))
            rows["box"].append(prediction.box)
            rows["score"].append(prediction.score)
        return {
            "image_id": np.array(rows["image_id"], dtype=object),
            "instance_id": np.array(rows["instance_id"], dtype=object),
            "mask": np.array(rows["mask"], dtype=object),
            "box": np.array(rows["box"], dtype=np.float64).reshape(-1, 4),
            "score": np.array(rows["score"], dtype=np.float64),
        }
