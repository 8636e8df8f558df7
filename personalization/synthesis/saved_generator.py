"""A personalized generator on disk: what a DreamBooth run saves (only what it trained) and how a sampler loads
it back over its base model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from personalization.errors import UserError
from personalization.paths import looks_local
from personalization.synthesis.generators import PERSONALIZED_FILE, GeneratorSpec, find_generator


class DreamboothError(UserError):
    """Bad DreamBooth input; the message names what is wrong and the fix."""


def check_generator_dir(path: str | Path) -> Path:
    """A local diffusers folder must hold ``model_index.json``; HF ids are left to ``from_pretrained``."""
    path = Path(path)
    if looks_local(path) and not (path / "model_index.json").is_file():
        raise DreamboothError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); point it at a folder saved by "
            "StableDiffusionPipeline.save_pretrained or an HF id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    return path


def save_dreambooth(
    pipe,
    out_dir: str | Path,
    mode: str,
    base_model: str | Path = "",
    components: Sequence[str] = ("unet",),
    spec: GeneratorSpec | None = None,
) -> Path:
    """Save only what was trained; the frozen rest is referenced by ``base_model``, never copied.

    LoRA: the UNet adapter in the diffusers LoRA format (``spec.save_lora``; ``pipe.load_lora_weights(out_dir)``
    loads it). Full: each trained component (``unet``, the text encoders) as a half-precision
    diffusers/transformers subfolder plus ``personalized_generator.json`` naming the base;
    :func:`load_personalized_pipeline` puts them together (about 1.9 GB per object for SD 1.5 instead of a 4 GB
    fp32 copy of the whole pipeline). ``spec``: the generator (default: detected from ``base_model``).
    """
    spec = spec or find_generator(base_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.unet.eval()
    for name in spec.text_encoders:
        getattr(pipe, name).eval()
    if mode == "lora":
        spec.save_lora(pipe, out_dir)
        return out_dir
    for name in components:
        getattr(pipe, name).to("cpu", torch.float16).save_pretrained(out_dir / name, safe_serialization=True)
    meta = {"base_model": str(base_model), "components": list(components), "dtype": "float16"}
    (out_dir / PERSONALIZED_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def load_personalized_pipeline(
    folder: str | Path, dtype: torch.dtype = torch.float32, spec: GeneratorSpec | None = None, **kwargs
):
    """A full-mode DreamBooth output as its generator's pipeline: the base model with the trained components of
    ``folder`` in place of its own. ``spec``: the generator (default: detected from the base model)."""
    folder = Path(folder)
    meta = json.loads((folder / PERSONALIZED_FILE).read_text())
    parts = {name: _load_component(folder / name, dtype) for name in meta["components"]}
    try:
        base = check_generator_dir(meta["base_model"])
    except DreamboothError as error:
        raise DreamboothError(f"{folder}: its base model is gone ({error}); restore it or re-run dreambooth") from None
    return (spec or find_generator(base)).load_pipeline(base, dtype=dtype, **parts, **kwargs)


def _load_component(folder: Path, dtype: torch.dtype):
    """A saved diffusers model (its config's ``_class_name``) or transformers model (``architectures``)."""
    config = json.loads((folder / "config.json").read_text())
    if "_class_name" in config:
        import diffusers

        return getattr(diffusers, config["_class_name"]).from_pretrained(folder, dtype=dtype)
    import transformers

    return getattr(transformers, config["architectures"][0]).from_pretrained(folder, dtype=dtype)
