"""The Encoder: one backbone, three feature heads (training feature, global embedding, dense patch grid)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from personalization.config import ModelConfig
from personalization.models.families import Family, get_family
from personalization.models.registry import BackboneSpec, get_spec, load_backbone

EmbedKind = Literal["cls", "cls+mean"]


class Encoder(nn.Module):
    """A vision backbone with the feature heads the pipeline needs; built by :func:`build_encoder`.

    Input everywhere: ``pixels`` (B, 3, H, W) float, already normalized with ``spec.mean/std`` (see
    ``build_transform``). H and W need not be the pretraining size: ViT position embeddings are interpolated.
    The ViT token grid is (h, w) = (H // p, W // p) with p = ``encoder.patch_size``; the CNN grid is its last
    feature map (stride 32). Every output is L2-normalized along the last dim.

    - ``train_features(pixels)`` (= ``forward``) -> (B, D), the contrastive training feature.
      ViT: ``normalize(concat(cls, mean_ij patch_ij))`` with cls and patches taken after the final LayerNorm
      (CLIP: ``post_layernorm`` applied to every token, so cls is CLIP's pooled output). D = 2C (1536 for ViT-B).
      CNN: ``normalize(concat(normalize(avgpool(F)), normalize(mean_ij normalize(F_ij))))``: both halves are unit
      vectors first, else the pooled half (norm ~10) would drown the cell half (norm <= 1). D = 2560.
    - ``embed(pixels, kind)`` -> (B, D') evaluation feature. ``"cls"``: the CLS token (CNN: the pooled vector);
      for CLIP the *projected* image embedding when the checkpoint has ``visual_projection`` (D' = 512 for
      ViT-B/16), as the pretrained CLIP baseline is evaluated. ``"cls+mean"``: the training feature.
    - ``dense(pixels)`` -> (B, h, w, C) patch features (ViT: final-norm patch tokens; CNN: last feature map).

    ``backbone`` is the bare transformers / torchvision model, or a ``peft.PeftModel`` around it once
    ``apply_lora`` / ``load_adapter`` ran. Frozen BatchNorm layers stay in eval mode in ``train()``: LoRA training
    must not drift the pretrained running statistics.
    """

    def __init__(self, spec: BackboneSpec, backbone: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone

    @property
    def base_model(self) -> nn.Module:
        """The transformers / torchvision model (LoRA layers, if any, are injected into it in place)."""
        get_base = getattr(self.backbone, "get_base_model", None)
        return get_base() if callable(get_base) else self.backbone

    @property
    def family(self) -> Family:
        """The adapter of ``spec.family``: how this backbone's tokens and features are computed."""
        return get_family(self.spec.family)

    @property
    def patch_size(self) -> int:
        """Stride of the dense grid: the loaded checkpoint's ViT patch size (a tiny zoo model may differ from the
        registry's), 32 for the CNN."""
        config = getattr(self.base_model, "config", None)
        return config.patch_size if config is not None else self.spec.patch_size

    @property
    def width(self) -> int:
        """C: channels of one token / cell (768 for ViT-B, 1280 for MobileNetV2)."""
        return self.family.width(self.base_model)

    @property
    def feature_dim(self) -> int:
        """D of ``train_features``."""
        return 2 * self.width

    def embed_dim(self, kind: EmbedKind = "cls") -> int:
        """D' of ``embed(pixels, kind)``."""
        if kind == "cls+mean":
            return self.feature_dim
        projection = getattr(self.base_model, "visual_projection", None)
        return projection.out_features if projection is not None else self.width

    def tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalized (cls (B, C), grid (B, h, w, C)); cls is the pooled vector for the CNN."""
        return self.family.tokens(self.base_model, pixels, self.patch_size)

    def train_features(self, pixels: torch.Tensor) -> torch.Tensor:
        cls, grid = self.tokens(pixels)
        return self._cls_mean(cls, grid)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.train_features(pixels)

    def embed(self, pixels: torch.Tensor, kind: EmbedKind = "cls") -> torch.Tensor:
        cls, grid = self.tokens(pixels)
        if kind == "cls+mean":
            return self._cls_mean(cls, grid)
        if kind != "cls":
            raise ValueError(f"embed kind must be 'cls' or 'cls+mean', got {kind!r} (model.eval_feature)")
        projection = getattr(self.base_model, "visual_projection", None)
        if projection is not None:
            cls = projection(cls)
        return F.normalize(cls, dim=-1)

    def dense(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tokens(pixels)[1], dim=-1)

    def _cls_mean(self, cls: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return self.family.cls_mean(cls, grid)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()
        return self


def build_encoder(model_cfg: ModelConfig) -> Encoder:
    """Build ``model_cfg.backbone`` and load ``model_cfg.weights`` (or the registry default); returns it in eval mode.

    A folder is loaded with ``from_pretrained(folder, local_files_only=True)`` and its ``config.json`` decides the
    architecture (so a tiny zoo model loads under the real name); an HF id must already be in the local cache.
    """
    spec = get_spec(model_cfg.backbone)
    return Encoder(spec, load_backbone(spec, model_cfg.weights)).eval()
