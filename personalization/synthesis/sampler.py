"""Sampling images from (personalized) Stable Diffusion: generation rows in, image-table columns out.

``ImageSampler`` is a callable class for Ray Data's ``map_batches`` (and works without Ray): it loads a pipeline
once in ``__init__`` and, for a batch of rows (instance_id, category, prompt, seed, cfg, generator, role, source),
returns the image-table columns with PNG bytes. A *generator* is either a diffusers folder (the pretrained or a
fully fine-tuned model) or a LoRA folder (``pytorch_lora_weights.safetensors``) applied on ``base_model``; LoRA
generators are swapped as named adapters on one pipeline instead of reloading it. How a pipeline loads and takes a
LoRA is its generator type's (``GENERATORS``, personalization/synthesis/generators.py), detected from ``base_model``
or named by ``generator_type``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from personalization.devices import pick_device
from personalization.schema import encode_png
from personalization.synthesis.generation_rows import SamplerError, check_generator, image_id_for, is_lora
from personalization.synthesis.generators import AUTO, find_generator, is_personalized_folder
from personalization.synthesis.saved_generator import load_personalized_pipeline

log = logging.getLogger(__name__)
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def _dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


class ImageSampler:
    """Callable: batch of generation rows (dict of numpy arrays) -> image-table columns (dict of numpy arrays).

    ``base_model``: the diffusers folder / HF id LoRA generators apply to. ``generator_type``: its GENERATORS
    name, or auto (detected from ``base_model``). ``steps``, ``image_size``, ``scheduler`` (dpm, ddim, ddpm,
    euler, pndm) are shared by all rows; seed and cfg come per row.
    """

    def __init__(
        self,
        base_model: str,
        *,
        generator_type: str = AUTO,
        steps: int = 50,
        image_size: int = 512,
        scheduler: str = "dpm",
        dtype: str = "auto",
        device: str | None = None,
        max_pipelines: int = 1,
    ):
        if scheduler not in SCHEDULERS:
            raise SamplerError(f"scheduler={scheduler!r}: use one of {sorted(SCHEDULERS)}")
        self.base_model = check_generator(base_model)
        self.spec = find_generator(self.base_model, generator_type)
        self.steps, self.image_size, self.scheduler = steps, image_size, scheduler
        self.device = pick_device(device)
        self.dtype = _dtype(dtype, self.device)
        self.max_pipelines = max_pipelines
        self._pipes: OrderedDict[str, object] = OrderedDict()
        self._adapters: dict[str, str] = {}  # LoRA folder -> adapter name on the base pipeline
        self.loads = 0  # pipelines loaded from disk (adapters swapped in do not count)
        self._pipeline(self.base_model)  # load once, up front

    def _pipeline(self, folder: str):
        if folder in self._pipes:
            self._pipes.move_to_end(folder)
            return self._pipes[folder]
        import diffusers

        spec, options = self.spec, self.spec.no_safety_checker
        if is_personalized_folder(folder):
            pipe = load_personalized_pipeline(folder, dtype=self.dtype, spec=spec, **options)
        else:
            pipe = spec.load_pipeline(folder, dtype=self.dtype, **options)
        scheduler_cls = getattr(diffusers, SCHEDULERS[self.scheduler])
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(self.device)
        self.loads += 1
        self._pipes[folder] = pipe
        # Keep the base (it carries the LoRA adapters) plus the `max_pipelines` most recent full generators.
        others = [key for key in self._pipes if key != self.base_model]
        for key in others[: max(0, len(others) - self.max_pipelines)]:
            del self._pipes[key]
        return pipe

    def _select(self, generator: str):
        """The pipeline for ``generator``, with the right LoRA adapter active (or none)."""
        if not is_lora(generator, self.spec.lora_file):
            pipe = self._pipeline(check_generator(generator))
            if generator == self.base_model and self._adapters:
                pipe.disable_lora()
            return pipe
        pipe = self._pipeline(self.base_model)
        if generator not in self._adapters:
            name = f"g{len(self._adapters)}"
            self.spec.load_lora(pipe, generator, name)
            self._adapters[generator] = name
        pipe.enable_lora()
        pipe.set_adapters([self._adapters[generator]])
        return pipe

    def generate(self, generator: str, prompts: Sequence[str], seeds: Sequence[int], cfg: float) -> list[np.ndarray]:
        """(N,) prompts and seeds -> N uint8 (S, S, 3) images; each seed alone fixes its image."""
        if cfg < 1:
            raise SamplerError(f"cfg={cfg}: classifier-free guidance must be >= 1")
        pipe = self._select(generator)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        # Per-row initial latents from a CPU generator: the image then does not depend on the batch it lands in.
        channels = pipe.unet.config.in_channels
        side = self.image_size // pipe.vae_scale_factor
        latents = torch.stack([torch.randn((channels, side, side), generator=g) for g in generators])
        with torch.inference_mode():
            out = pipe(
                list(prompts),
                num_inference_steps=self.steps,
                guidance_scale=float(cfg),
                height=self.image_size,
                width=self.image_size,
                latents=latents.to(self.device, self.dtype),
                output_type="np",
            )
        return [np.clip(np.round(im * 255), 0, 255).astype(np.uint8) for im in out.images]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["prompt"])
        images: list[bytes | None] = [None] * n
        groups: dict[tuple[str, float], list[int]] = {}
        for i in range(n):
            groups.setdefault((str(batch["generator"][i]), float(batch["cfg"][i])), []).append(i)
        for (generator, cfg), rows in groups.items():
            made = self.generate(
                generator, [str(batch["prompt"][i]) for i in rows], [int(batch["seed"][i]) for i in rows], cfg
            )
            for i, image in zip(rows, made, strict=True):
                images[i] = encode_png(image)
        size = self.image_size
        ids = [
            image_id_for(
                str(batch["generator"][i]),
                str(batch["prompt"][i]),
                int(batch["seed"][i]),
                float(batch["cfg"][i]),
                self.steps,
                size,
            )
            for i in range(n)
        ]
        empty = np.array([""] * n, dtype=object)
        out = {
            "image_id": np.array(ids, dtype=object),
            "instance_id": np.asarray(batch["instance_id"], dtype=object),
            "category": np.asarray(batch["category"], dtype=object),
            "role": np.asarray(batch["role"], dtype=object),
            "source": np.asarray(batch["source"], dtype=object),
            "split": empty,
            "instance_split": np.asarray(batch.get("instance_split", empty), dtype=object),
            "prompt": np.asarray(batch["prompt"], dtype=object),
            "seed": np.asarray(batch["seed"], dtype=np.int64),
            "cfg": np.asarray(batch["cfg"], dtype=np.float32),
            "generator": np.asarray(batch["generator"], dtype=object),
            "image": np.array(images + [b""], dtype=object)[:n],  # the extra item keeps numpy from making 2-D
            "mask": np.array([None] * n, dtype=object),
            "width": np.full(n, size, dtype=np.int32),
            "height": np.full(n, size, dtype=np.int32),
            "score": np.array([None] * n, dtype=object),  # null = not filtered (a scorer fills it)
        }
        return out
