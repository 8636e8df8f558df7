"""Vision backbones for personalization: registry, Encoder feature heads, transforms and LoRA.

Importing this package loads no model (weights load in ``build_encoder``) and none of its submodules: each name
below is imported on first use, so that the config's check of ``model.backbone`` (which reads the registry) does not
pull in peft and transformers. See :class:`Encoder` for the feature contract and :mod:`personalization.models.lora`
for how a saved adapter loads with plain peft.
"""

import importlib

_HOMES = {
    "EmbedKind": "encoder",
    "Encoder": "encoder",
    "build_encoder": "encoder",
    "apply_lora": "lora",
    "build_lora_config": "lora",
    "load_adapter": "lora",
    "save_adapter": "lora",
    "BACKBONES": "registry",
    "BackboneSpec": "registry",
    "get_spec": "registry",
    "load_backbone": "registry",
    "build_transform": "transforms",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
