"""The generator table: what DreamBooth and the sampler need to know about a diffusers model family.

A :class:`GeneratorSpec` names the diffusers pipeline class, the text encoders a full fine-tune trains, how
prompts become the UNet's conditioning, and how a UNet LoRA is saved and loaded. ``GENERATORS`` holds them by
name; ``dreambooth.generator_type`` picks one, or ``auto`` detects it from the base model's ``model_index.json``
(its ``_class_name``). A new family (SDXL, say) is one entry here plus, when its prompts condition the UNet
differently, one subclass overriding :meth:`GeneratorSpec.unet_conditioning` (docs/extending.md).

Nothing heavy is imported here: diffusers and transformers load when a pipeline does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalization.errors import UserError
from personalization.paths import looks_local

log = logging.getLogger(__name__)
AUTO = "auto"
DEFAULT_GENERATOR = "sd15"  # for a hub id that is not in the local Hugging Face cache (nothing to read)
PERSONALIZED_FILE = "personalized_generator.json"  # a full-mode DreamBooth output: {base_model, components, dtype}


def is_personalized_folder(path: str | Path) -> bool:
    """Whether ``path`` is a full-mode DreamBooth output (its base model and trained components)."""
    return (Path(path) / PERSONALIZED_FILE).is_file()


class GeneratorError(UserError):
    """An unknown generator name, or a base model no registered generator matches; the message says the fix."""


@dataclass(frozen=True)
class GeneratorSpec:
    """One diffusers model family.

    ``pipeline``: the pipeline class, or its name in ``diffusers``. ``class_names``: the ``model_index.json``
    ``_class_name`` values detected as this family. ``text_encoders``: the pipeline components a full fine-tune
    trains beside the UNet (when ``train_text_encoder``). ``no_safety_checker``: ``from_pretrained`` arguments
    that leave the safety checker out (the sampler's and DreamBooth's loads). ``lora_targets``: the UNet modules
    a LoRA wraps. ``lora_file``: the file a saved LoRA folder holds.
    """

    name: str
    pipeline: str | type
    class_names: tuple[str, ...] = ()
    text_encoders: tuple[str, ...] = ("text_encoder",)
    no_safety_checker: dict[str, Any] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_file: str = "pytorch_lora_weights.safetensors"

    @property
    def pipeline_class(self) -> type:
        if isinstance(self.pipeline, str):
            import diffusers

            return getattr(diffusers, self.pipeline)
        return self.pipeline

    def load_pipeline(self, folder: str | Path, **kwargs):
        """``pipeline_class.from_pretrained(folder, **kwargs)``."""
        return self.pipeline_class.from_pretrained(folder, **kwargs)

    def unet_conditioning(self, pipe, prompts: Sequence[str], device, resolution: int) -> dict:
        """The UNet's keyword arguments for ``prompts`` (training): here CLIP's last hidden states,
        ``{"encoder_hidden_states": (N, 77, D)}``. A family with pooled or extra conditioning overrides this."""
        tokenizer = pipe.tokenizer
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip
        return {"encoder_hidden_states": pipe.text_encoder(ids)[0]}

    def save_lora(self, pipe, out_dir: Path) -> None:
        """The UNet's LoRA (peft, as DreamBooth adds it) in the diffusers LoRA format, ``lora_file`` in ``out_dir``."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        self.pipeline_class.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)

    def load_lora(self, pipe, folder: str | Path, adapter_name: str) -> None:
        pipe.load_lora_weights(folder, adapter_name=adapter_name)


GENERATORS: dict[str, GeneratorSpec] = {
    "sd15": GeneratorSpec(
        name="sd15",
        pipeline="StableDiffusionPipeline",
        class_names=("StableDiffusionPipeline",),
        no_safety_checker={"safety_checker": None, "requires_safety_checker": False},
    ),
}


def get_generator(name: str) -> GeneratorSpec:
    if name not in GENERATORS:
        raise GeneratorError(
            f"dreambooth.generator_type={name!r} is not a registered generator type; use auto or one of "
            f"{sorted(GENERATORS)} (a new one is an entry in GENERATORS, personalization/synthesis/generators.py)"
        )
    return GENERATORS[name]


def find_generator(base_model: str | Path, name: str = AUTO) -> GeneratorSpec:
    """The spec called ``name``, or with ``auto`` the one whose ``class_names`` hold the base model's
    ``model_index.json`` ``_class_name``. ``base_model`` may be a diffusers folder, a full-mode DreamBooth output
    (its base is read) or a hub id (read from the local Hugging Face cache; not cached: ``sd15``)."""
    if name != AUTO:
        return get_generator(name)
    index = _model_index(base_model)
    if index is None:
        log.info("generator of %s: no model_index.json to read, using %s", base_model, DEFAULT_GENERATOR)
        return get_generator(DEFAULT_GENERATOR)
    class_name = json.loads(index.read_text()).get("_class_name")
    for spec in GENERATORS.values():
        if class_name in spec.class_names:
            return spec
    raise GeneratorError(
        f"{index}: _class_name {class_name!r} matches no registered generator type ({sorted(GENERATORS)}); set "
        "dreambooth.generator_type=<name>, or register a GeneratorSpec in personalization/synthesis/generators.py"
    )


def _model_index(base_model: str | Path) -> Path | None:
    path = Path(base_model).expanduser()
    if (path / PERSONALIZED_FILE).is_file():
        return _model_index(json.loads((path / PERSONALIZED_FILE).read_text())["base_model"])
    if looks_local(path):
        return path / "model_index.json" if (path / "model_index.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(base_model), "model_index.json")
    except ValueError:  # not a valid hub id either; from_pretrained reports it where the model loads
        return None
    return Path(cached) if isinstance(cached, str) else None
