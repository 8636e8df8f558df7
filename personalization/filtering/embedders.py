"""DreamSim as an image embedder, loaded through the real ``dreamsim`` package from a local cache.

``dreamsim(pretrained=True, cache_dir=...)`` downloads whenever its cache lacks a file, so we check the cache
first and fail with a clear message instead of reaching for the network. Embeddings are DreamSim's (mean-centred,
L2-normalized), so the cosine similarity of two embeddings is ``1 - DreamSim distance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from personalization.devices import pick_device
from personalization.errors import UserError

# What dreamsim 0.2.1 needs in its cache per model type (its download unpacks exactly these).
DREAMSIM_FILES = {
    "ensemble": (
        "dino_vitb16_pretrain.pth",
        "open_clip_vitb16_pretrain.pth.tar",
        "clip_vitb16_pretrain.pth.tar",
        "ensemble_lora",
    ),
    "dino_vitb16": ("dino_vitb16_pretrain.pth", "dino_vitb16_single_lora"),
    "dinov2_vitb14": ("dinov2_vitb14_pretrain.pth", "dinov2_vitb14_single_lora"),
    "open_clip_vitb32": ("open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"),
    "clip_vitb32": ("clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"),
    "synclr_vitb16": ("synclr_vit_b_16.pth", "synclr_vitb16_single_lora"),
}


class EmbedderError(UserError):
    """A DreamSim cache or setting that cannot be used; the message names the folder and the fix."""


def check_dreamsim_cache(cache_dir: str | Path, dreamsim_type: str) -> Path:
    """The cache folder, after checking it holds every file ``dreamsim_type`` needs (so nothing is downloaded)."""
    if dreamsim_type not in DREAMSIM_FILES:
        raise EmbedderError(f"filter.dreamsim_type={dreamsim_type!r}: use one of {sorted(DREAMSIM_FILES)}")
    folder = Path(cache_dir)
    missing = [name for name in DREAMSIM_FILES[dreamsim_type] if not (folder / name).exists()]
    if missing:
        raise EmbedderError(
            f"filter.cache_dir={folder}: DreamSim cache for {dreamsim_type!r} lacks {missing}; unpack the released "
            "DreamSim checkpoint there (on a machine with network: dreamsim.dreamsim(cache_dir=...)) or, for tests, "
            "build the tiny one with personalization.zoo.dreamsim.build_dreamsim_cache"
        )
    return folder


class DreamSimEmbedder:
    """``embed(images) -> (N, D)`` and ``patch_features(images) -> (N, h, w, C)``, both L2-normalized."""

    def __init__(
        self, cache_dir: str | Path, dreamsim_type: str = "ensemble", device: str | None = None, batch_size: int = 32
    ):
        from dreamsim import dreamsim

        folder = check_dreamsim_cache(cache_dir, dreamsim_type)
        self.device = pick_device(device)
        self.model, self._preprocess = dreamsim(
            pretrained=True, device=str(self.device), cache_dir=str(folder), dreamsim_type=dreamsim_type
        )
        self.batch_size = batch_size

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, 224, 224) in [0, 1], DreamSim's own preprocessing."""
        return torch.cat([self._preprocess(image) for image in images]).to(self.device)

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            feats = self.model.embed(self._pixels(images[start : start + self.batch_size]))
            out.append(F.normalize(feats.reshape(feats.shape[0], -1).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 1)

    @torch.inference_mode()
    def patch_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Last-block patch tokens of DreamSim's first backbone: (N, h, w, C), h = w = 224 / patch."""
        perceptual = self.model.base_model.model if hasattr(self.model, "base_model") else self.model
        extractor = perceptual.extractor_list[0]
        pixels = perceptual._preprocess(self._pixels(images), perceptual.model_list[0])
        tokens = extractor.extract_descriptors(pixels, 11)[:, 0, 0, 1:]  # (N, t, C): drop the CLS token
        side = int(round(tokens.shape[1] ** 0.5))
        return F.normalize(tokens.reshape(tokens.shape[0], side, side, -1).float(), dim=-1)
