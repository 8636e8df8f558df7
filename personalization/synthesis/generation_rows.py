"""What a generation run makes, without loading a model: the generation rows (prompt, seed, guidance, generator),
their image ids, and the checks on a generator folder. Light on purpose (no torch): the driver plans with it, and so
do Ray task workers that import the pipelines (``ImageSampler`` in personalization/synthesis/sampler.py makes the
images).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from personalization.artifacts import read_manifest
from personalization.errors import UserError
from personalization.schema import make_image_id
from personalization.synthesis.generators import PERSONALIZED_FILE, is_personalized_folder

LORA_FILE = "pytorch_lora_weights.safetensors"


class SamplerError(UserError):
    """A generator, row or setting the sampler cannot use; the message says which and how to fix it."""


def is_lora(generator: str | Path, lora_file: str = LORA_FILE) -> bool:
    return (Path(generator) / lora_file).is_file()


def check_generator(generator: str | Path) -> str:
    """A local generator must be a diffusers folder (model_index.json) or a LoRA folder; else a SamplerError."""
    path = Path(generator)
    if path.exists() or str(generator).startswith((".", "/", "~")):
        if not ((path / "model_index.json").is_file() or is_lora(path) or is_personalized_folder(path)):
            raise SamplerError(
                f"generator {generator} is neither a diffusers folder (model_index.json), a LoRA folder "
                f"({LORA_FILE}) nor a DreamBooth output ({PERSONALIZED_FILE}); run `personalize dreambooth` first "
                "or point at a saved pipeline"
            )
    return str(generator)


@functools.lru_cache(maxsize=256)
def generator_key(generator: str) -> str:
    """What identifies a generator in image ids, independent of where the output folder lies: a stage output's
    manifest hash (a personalized generator), else a local folder's name, else the Hugging Face id as given."""
    path = Path(generator)
    if path.is_dir():
        manifest = read_manifest(path)
        return f"manifest:{manifest['hash']}" if manifest else f"local:{path.name}"
    return str(generator)


def image_id_for(generator: str, prompt: str, seed: int, cfg: float, steps: int, size: int) -> str:
    key = generator_key(str(generator))
    return make_image_id("generated", key, prompt, int(seed), float(cfg), int(steps), int(size))


def make_generation_rows(
    instance_id: str,
    category: str,
    prompts: Sequence[str],
    n: int,
    *,
    generator: str,
    cfg: float,
    seed: int = 0,
    role: str = "positive",
    source: str = "dreambooth",
    instance_split: str = "",
) -> list[dict]:
    """``n`` rows cycling through ``prompts`` (so ``ceil(n / len(prompts))`` per prompt), seeds ``seed + i``."""
    if cfg < 1:
        raise SamplerError(f"cfg={cfg}: classifier-free guidance must be >= 1 (the paper uses 5.0)")
    if not prompts:
        raise SamplerError(f"instance {instance_id!r}: no prompts")
    return [
        {
            "instance_id": instance_id,
            "category": category,
            "prompt": prompts[i % len(prompts)],
            "seed": seed + i,
            "cfg": float(cfg),
            "generator": str(generator),
            "role": role,
            "source": source,
            "instance_split": instance_split,
        }
        for i in range(n)
    ]
