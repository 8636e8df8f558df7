"""A tiny random SAM in the layout of ``facebook/sam-vit-base``, for the filter's PerSAM-style masker.

``build_tiny_sam(out_dir)`` writes what the hub folder holds and ``SamModel.from_pretrained`` /
``SamProcessor.from_pretrained`` read: ``config.json`` + ``model.safetensors`` (a ``SamModel``) and
``preprocessor_config.json`` (a ``SamImageProcessor``). Point ``filter.sam_weights`` at it. Sizes: 64 px input,
patch 8 (an 8x8 embedding grid), hidden 32, 2 vision layers, 32-px low-resolution masks; the processor resizes the
longest side to 64 and pads to 64x64, as the real one does at 1024.
"""

from __future__ import annotations

from pathlib import Path

import torch

SIDE, PATCH, HIDDEN = 64, 8, 32


def build_tiny_sam(out_dir: Path) -> Path:
    """A random ``SamModel`` and its ``SamImageProcessor``, saved with ``save_pretrained`` into ``out_dir``."""
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    vision = SamVisionConfig(
        hidden_size=HIDDEN, output_channels=HIDDEN, num_hidden_layers=2, num_attention_heads=2, image_size=SIDE,
        patch_size=PATCH, window_size=4, global_attn_indexes=(1,), num_pos_feats=HIDDEN // 2, mlp_dim=2 * HIDDEN,
    )  # fmt: skip
    prompt = SamPromptEncoderConfig(hidden_size=HIDDEN, image_size=SIDE, patch_size=PATCH)
    decoder = SamMaskDecoderConfig(
        hidden_size=HIDDEN, mlp_dim=2 * HIDDEN, num_attention_heads=2, iou_head_hidden_dim=HIDDEN
    )
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    SamModel(config).save_pretrained(out_dir)
    low_res = SIDE // PATCH * 4  # the mask decoder upsamples the embedding grid 4x
    SamImageProcessor(
        size={"longest_edge": SIDE},
        pad_size={"height": SIDE, "width": SIDE},
        mask_size={"longest_edge": low_res},
        mask_pad_size={"height": low_res, "width": low_res},
    ).save_pretrained(out_dir)
    return Path(out_dir)
