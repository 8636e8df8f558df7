"""Image preprocessing per backbone: the reference eval pipeline and the reference training augmentation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from personalization.config import ModelConfig
from personalization.models.registry import get_spec


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


_MODES = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def build_transform(
    model_cfg: ModelConfig, train: bool, size: int | None = None, crop_scale: float = 0.8
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalized float tensor (3, size, size), ``size`` defaulting to ``model.image_size``.

    Eval: resize the shorter side to ``round(size * spec.resize / 224)`` then center-crop ``size`` (DINOv2, MAE,
    MobileNetV2: 256 -> 224; CLIP: 224 -> 224), then the backbone's mean/std.
    Train (reference augmentation): RandomResizedCrop(size, scale ``crop_scale``-1.0, the reference's 0.8), horizontal
    flip (p 0.5), rotation uniform in +-10 degrees, then mean/std.
    """
    spec = get_spec(model_cfg.backbone)
    size = size or model_cfg.image_size
    mode = _MODES[spec.interpolation]
    if train:
        geometry = [
            v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10, interpolation=v2.InterpolationMode.BILINEAR),
        ]
    else:
        resize = round(size * spec.resize / 224)
        geometry = [v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(size)]
    # Geometry runs on the uint8 image (cheaper than on floats), then scale to [0, 1] and normalize.
    return v2.Compose(
        [
            v2.Lambda(_to_rgb),
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
        ]
    )
