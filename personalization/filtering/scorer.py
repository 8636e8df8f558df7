"""Scoring generated images against an instance's real photos, and the "until N accepted" stop.

score(g) = (1/K) sum_k cos(e(crop(g)), e(crop_k)),  e = DreamSim embedding (L2-normalized),
crop_k = real train image k cropped to its mask's box, crop(g) = the generated image cropped to the masker's box.
The acceptance threshold is applied when reading (``read_image_table(min_score=...)``), so every scored row is
kept and a sweep over the threshold costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from personalization.errors import UserError
from personalization.filtering.embedders import DreamSimEmbedder
from personalization.filtering.maskers import NoMasker, PatchMasker, SamMasker, build_masker, crop_box, mask_box
from personalization.schema import decode_image, decode_mask, read_image_table


def compute_scores(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(N, D) and (K, D) L2-normalized embeddings -> (N,) mean cosine similarity to the K real ones."""
    return (generated @ real.T).mean(dim=1)


def _patch_part(masker) -> PatchMasker | None:
    if isinstance(masker, SamMasker):
        return masker.patch_masker
    return masker if isinstance(masker, PatchMasker) else None


class Scorer:
    """Callable for ``map_batches``: fills ``score`` for rows whose instance has real train images in
    ``real_table`` (other rows keep a null score). Real crops are embedded once per instance and cached."""

    def __init__(
        self,
        real_table: str,
        cache_dir: str,
        *,
        dreamsim_type: str = "ensemble",
        masker: str = "auto",
        sam_weights: str = "",
        device: str | None = None,
        batch_size: int = 16,
    ):
        self.real_table = str(real_table)
        self.embedder = DreamSimEmbedder(cache_dir, dreamsim_type, device=device, batch_size=batch_size)
        self.masker = build_masker(masker, self.embedder, sam_weights, device)
        self._references: dict[str, tuple[torch.Tensor, torch.Tensor | None] | None] = {}

    def reference(self, instance_id: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(K, D) real crop embeddings and the masker's patch reference for an instance; None without photos."""
        if instance_id not in self._references:
            rows = read_image_table(
                self.real_table, role="real_train", instance_id=instance_id, columns=["image", "mask"]
            ).to_pylist()
            if not rows:
                self._references[instance_id] = None
                return None
            images = [decode_image(r["image"]) for r in rows]
            masks = [
                decode_mask(r["mask"]) if r["mask"] is not None else np.ones(im.size[::-1], bool)
                for r, im in zip(rows, images, strict=True)
            ]
            crops = [crop_box(im, mask_box(m)) for im, m in zip(images, masks, strict=True)]
            patch = _patch_part(self.masker)
            if patch is not None:
                patch.fit(images, masks)
            self._references[instance_id] = (self.embedder.embed(crops), patch.reference if patch else None)
        return self._references[instance_id]

    def score_images(self, instance_id: str, images: list) -> np.ndarray | None:
        ref = self.reference(instance_id)
        if ref is None:
            return None
        real, patch_ref = ref
        patch = _patch_part(self.masker)
        if patch is not None:
            patch.reference = patch_ref
        boxes = self.masker.boxes(images) if not isinstance(self.masker, NoMasker) else [None] * len(images)
        crops = [crop_box(im, box) for im, box in zip(images, boxes, strict=True)]
        return compute_scores(self.embedder.embed(crops), real).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image"])
        scores: list[float | None] = [None] * n
        by_instance: dict[str, list[int]] = {}
        for i in range(n):
            by_instance.setdefault(str(batch["instance_id"][i]), []).append(i)
        for instance_id, rows in by_instance.items():
            values = self.score_images(instance_id, [decode_image(batch["image"][i]) for i in rows])
            if values is not None:
                for i, value in zip(rows, values, strict=True):
                    scores[i] = float(value)
        out = dict(batch)
        # float32 with NaN would be dropped by min_score filters; keep Python floats / None (null = unscored)
        out["score"] = np.array(scores + [0.0], dtype=object)[:n]
        return out


def take_until_accepted(
    batches: Iterable[Mapping[str, np.ndarray]], needed: Mapping[str, int], threshold: float
) -> Iterator[Mapping[str, np.ndarray]]:
    """Pass scored batches through until every instance in ``needed`` has that many rows with score >= threshold.

    Stopping the iteration is what stops a streaming generator upstream; every batch seen is yielded (rejected
    rows too: the threshold is applied again at read time).
    """
    accepted = dict.fromkeys(needed, 0)
    for batch in batches:
        yield batch
        for instance_id, score in zip(batch["instance_id"], batch["score"], strict=True):
            if score is not None and str(instance_id) in accepted and float(score) >= threshold:
                accepted[str(instance_id)] += 1
        if all(accepted[k] >= needed[k] for k in needed):
            return


def check_real_table(path: str | Path, instance_ids: Iterable[str]) -> None:
    """Every instance to filter needs real train photos in the ingest table; else a clear error."""
    have = set(read_image_table(path, role="real_train", columns=["instance_id"]).column("instance_id").to_pylist())
    missing = sorted(set(instance_ids) - have)
    if missing:
        raise UserError(f"{path}: no real_train images for instances {missing}; run `personalize ingest` first")


def low_acceptance(
    seen: Mapping[str, int], accepted: Mapping[str, int], *, min_rate: float = 0.02, min_seen: int = 50
) -> dict[str, float]:
    """{instance: acceptance rate} for the instances whose filter accepted under ``min_rate`` of at least
    ``min_seen`` scored images: their generator is not personalized enough, or the threshold is too strict."""
    return {
        instance: accepted.get(instance, 0) / count
        for instance, count in sorted(seen.items())
        if count >= min_seen and accepted.get(instance, 0) / count < min_rate
    }
