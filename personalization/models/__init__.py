"""Vision backbones for personalization: registry, Encoder feature heads, transforms and LoRA.

Importing this package loads no model (weights load in ``build_encoder``); see :class:`Encoder` for the feature
contract and :mod:`personalization.models.lora` for how a saved adapter loads with plain peft.
"""

from personalization.models.encoder import EmbedKind, Encoder, build_encoder
from personalization.models.lora import apply_lora, build_lora_config, load_adapter, save_adapter
from personalization.models.registry import BACKBONES, BackboneSpec, get_spec, load_backbone
from personalization.models.transforms import build_transform

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "EmbedKind",
    "Encoder",
    "apply_lora",
    "build_encoder",
    "build_lora_config",
    "build_transform",
    "get_spec",
    "load_adapter",
    "load_backbone",
    "save_adapter",
]
