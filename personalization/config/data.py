"""The dataset to read and the backbone to personalize."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from personalization.config.fields import path_field
from personalization.config.layers import check_positive, require, require_path


@dataclass(frozen=True)
class DataConfig:
    """Where the photos are and which instances to work on."""

    root: str = path_field()  # dataset folder (PODS / Dogs / DF2 layout) or a plain folder of one object's photos
    layout: str = "auto"  # auto (detected) or a name in LAYOUTS (personalization/datasets/layouts.py)
    category: str = ""  # plain-folder layout only: the object's category, e.g. "mug"
    instance_id: str = ""  # plain-folder layout only: a name for the object (default: the folder name)
    instances: tuple[str, ...] = ()  # instances to personalize; empty = every instance whose split is `test`
    max_instances: int = 0  # 0 = no limit; else the first N selected instances (sorted)
    max_test_images: int = 0  # 0 = all; else a seeded sample of each instance's test images per split
    max_side: int = 1024  # photos (and masks) larger than this are downscaled on ingest; 0 = keep full size
    max_pixels: int = 100_000_000  # files with more pixels are refused before decoding (a decompression-bomb guard)

    def validate(self) -> None:
        from personalization.datasets.layouts import layout_choices  # here: the datasets package loads PIL, pyarrow

        choices = layout_choices()
        require(self.layout in choices, "data.layout", f"must be one of {list(choices)}, got {self.layout!r}")
        check_positive(self.max_instances, "data.max_instances", allow_zero=True)
        check_positive(self.max_test_images, "data.max_test_images", allow_zero=True)
        check_positive(self.max_side, "data.max_side", allow_zero=True)
        check_positive(self.max_pixels, "data.max_pixels")
        if self.root:
            require_path(self.root, Path.exists, "data.root", f"{self.root} does not exist; pass data.root=DIR")

    def require_root(self) -> Path:
        """``root``, for the commands that read the dataset (ingest; run and sweep before any work); the other
        stages read OUT/ingest and need none."""
        require(
            bool(self.root),
            "data.root",
            "pass data.root=DIR (a dataset folder, e.g. PODS layout, or a folder of your object's photos)",
        )
        return Path(self.root)


@dataclass(frozen=True)
class ModelConfig:
    """The vision backbone to personalize, and its LoRA."""

    backbone: str = "dinov2_vitb14"  # a registry name: dinov2_vitb14, clip_vitb16, mae_vitb16, mobilenetv2
    weights: str = path_field()  # HF id or local folder; empty = the registry's default for the backbone
    image_size: int = 224
    eval_feature: Literal["cls", "cls+mean"] = "cls"
    lora_r: int = 16
    lora_alpha: float = 0.5
    lora_dropout: float = 0.3
    lora_targets: tuple[str, ...] = ()  # empty = the registry's default (attention q/k/v)
    train_blocks: int = 0  # CNN backbones: also train the last N blocks in full (0 = LoRA only)

    def validate(self) -> None:
        from personalization.models.registry import BACKBONES  # here, not at the top: the registry needs torch

        require(self.backbone in BACKBONES, "model.backbone", f"{self.backbone!r} is not one of {sorted(BACKBONES)}")
        check_positive(self.image_size, "model.image_size")
        check_positive(self.lora_r, "model.lora_r")
        check_positive(self.lora_alpha, "model.lora_alpha")
        require(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")
        check_positive(self.train_blocks, "model.train_blocks", allow_zero=True)
