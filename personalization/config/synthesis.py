"""The sections that make training images: Cut-and-Paste, DreamBooth, generation and the DreamSim filter."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from personalization.config.fields import GpuChoice, check_gpu_choice, path_field
from personalization.config.layers import check_fraction, check_positive, require, require_path
from personalization.synthesis.generators import GENERATORS


@dataclass(frozen=True)
class CutpasteConfig:
    """Cut-and-Paste composites: the masked real object pasted onto backgrounds."""

    enabled: bool = True
    images_per_instance: int = 100
    # What the objects are pasted onto: generated (the paper's: num_backgrounds images of empty scenes sampled from
    # the pretrained generator, dreambooth.base_model, with background prompts and the generate.* sampling settings;
    # made once, OUT/cutpaste/_backgrounds/, and shared by every object), folder (the photos in backgrounds_dir) or
    # procedural (textures made from the seed, no generator); auto = folder when backgrounds_dir is set, else
    # generated when generate.enabled, else procedural (see background_source)
    backgrounds: Literal["auto", "procedural", "folder", "generated"] = "auto"
    backgrounds_dir: str = path_field()  # folder of background photos (read recursively)
    # Generated backgrounds: as many as an object's composites by default, so its 100 composites draw ~63 distinct
    # scenes; on a GPU about as long as 1/5 of one object's positives, once per output folder
    num_backgrounds: int = 100
    scale_min: float = 0.3
    scale_max: float = 1.3
    # object: the scale multiplies the object's size in its photo (paper); canvas: 1.0 = half the canvas side
    scale_of: Literal["object", "canvas"] = "object"
    extra_augment: bool = False  # also random flips, +-15 degree rotations, colour jitter (not in the paper)
    image_size: int = 256
    include_val: bool = True  # also composite the val instances (they serve as negatives)

    def validate(self) -> None:
        check_positive(self.images_per_instance, "cutpaste.images_per_instance", allow_zero=True)
        check_positive(self.scale_min, "cutpaste.scale_min")
        require(self.scale_max >= self.scale_min, "cutpaste.scale_max", "must be >= cutpaste.scale_min")
        check_positive(self.image_size, "cutpaste.image_size")
        check_positive(self.num_backgrounds, "cutpaste.num_backgrounds")
        if self.backgrounds_dir:
            require_path(
                self.backgrounds_dir,
                Path.is_dir,
                "cutpaste.backgrounds_dir",
                f"{self.backgrounds_dir} is not a folder; point it at background photos or leave it empty",
            )
        require(
            self.backgrounds != "folder" or bool(self.backgrounds_dir),
            "cutpaste.backgrounds_dir",
            "cutpaste.backgrounds=folder needs cutpaste.backgrounds_dir=DIR (photos of empty scenes)",
        )
        require(
            self.backgrounds not in ("procedural", "generated") or not self.backgrounds_dir,
            "cutpaste.backgrounds",
            f"{self.backgrounds} does not read cutpaste.backgrounds_dir={self.backgrounds_dir}: clear the folder or "
            "use cutpaste.backgrounds=folder",
        )

    def background_source(self, generation_on: bool) -> str:
        """procedural, folder or generated: ``backgrounds``, with auto resolved (``generation_on`` =
        generate.enabled)."""
        if self.backgrounds != "auto":
            return self.backgrounds
        if self.backgrounds_dir:
            return "folder"
        return "generated" if generation_on else "procedural"


# Per-mode DreamBooth learning rates: the paper's full fine-tune (2e-6, constant), and the usual LoRA DreamBooth
# recipe of diffusers (1e-4).
DREAMBOOTH_LEARNING_RATES = {"full": 2e-6, "lora": 1e-4}


@dataclass(frozen=True)
class DreamboothConfig:
    """Personalizing Stable Diffusion on an instance's photos."""

    enabled: bool = False
    base_model: str = path_field("stable-diffusion-v1-5/stable-diffusion-v1-5")  # HF id or local diffusers folder
    # The base model's family in GENERATORS (personalization/synthesis/generators.py): auto = detected from its
    # model_index.json (_class_name), else sd15; or a registered name such as sd15
    generator_type: str = "auto"
    mode: Literal["full", "lora"] = "full"
    masked: bool = True
    steps: int = 400
    learning_rate: float = 0.0  # 0 = the mode's default (DREAMBOOTH_LEARNING_RATES); see effective_learning_rate
    batch_size: int = 1
    resolution: int = 512
    prior_preservation: bool = True
    prior_weight: float = 1.0
    class_images: int = 200
    train_text_encoder: bool = True
    lora_rank: int = 16
    gradient_checkpointing: bool = True
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit on CUDA (the reference's); needs the `gpu` extra
    checkpoint_every: int = 100  # steps between resumable checkpoints of a run (0 = none)
    max_failures: int = 2  # restarts of a failed run, each from its last checkpoint
    use_gpu: GpuChoice = "auto"  # the trainings and the class images (see GpuChoice)

    @property
    def effective_learning_rate(self) -> float:
        """``learning_rate``, or the mode's default when it is 0: a LoRA needs a learning rate about 50x a full
        fine-tune's to personalize anything in a few hundred steps."""
        return self.learning_rate or DREAMBOOTH_LEARNING_RATES[self.mode]

    def validate(self) -> None:
        check_positive(self.steps, "dreambooth.steps")
        check_positive(self.learning_rate, "dreambooth.learning_rate", allow_zero=True)
        check_positive(self.batch_size, "dreambooth.batch_size")
        check_positive(self.resolution, "dreambooth.resolution")
        require(self.resolution % 8 == 0, "dreambooth.resolution", "must be a multiple of 8")
        check_positive(self.prior_weight, "dreambooth.prior_weight", allow_zero=True)
        check_positive(self.class_images, "dreambooth.class_images", allow_zero=True)
        check_positive(self.lora_rank, "dreambooth.lora_rank")
        check_positive(self.checkpoint_every, "dreambooth.checkpoint_every", allow_zero=True)
        check_positive(self.max_failures, "dreambooth.max_failures", allow_zero=True)
        check_gpu_choice(self.use_gpu, "dreambooth.use_gpu")
        if self.generator_type != "auto":
            require(
                self.generator_type in GENERATORS,
                "dreambooth.generator_type",
                f"{self.generator_type!r} is not registered; use auto or one of {sorted(GENERATORS)}",
            )
        require(
            not self.use_8bit_adam or importlib.util.find_spec("bitsandbytes") is not None,
            "dreambooth.use_8bit_adam",
            "8-bit Adam needs bitsandbytes, which is not installed: pip install -e '.[gpu]' (bitsandbytes==0.50.2, "
            "CUDA machines), or set dreambooth.use_8bit_adam=false (torch AdamW, fp32 optimizer state)",
        )


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling positives from the personalized generator and negatives from the pretrained one."""

    enabled: bool = False
    positives_per_instance: int = 450
    negatives_per_category: int = 1000
    max_attempts: int = 5000
    prompts_file: str = path_field()  # JSON {instance_id: [prompts]}; empty = the built-in prompt bank
    # template: the built-in bank; file: prompts_file; llm: an OpenAI-compatible endpoint named by the
    # PERSONALIZE_LLM_* environment variables (personalization/synthesis/llm.py), asked once and kept in
    # OUT/generate/prompts.json; auto: file when prompts_file is set, else template
    prompt_source: Literal["auto", "template", "file", "llm"] = "auto"
    num_prompts: int = 100
    guidance_scale: float = 5.0  # classifier-free guidance (paper: 5.0, compared with 4.0 / 7.5); was generate.cfg
    steps: int = 50
    image_size: int = 512
    scheduler: str = "dpm"
    batch_size: int = 4
    num_actors: int = 1
    gpus_per_actor: float = 1.0
    use_gpu: GpuChoice = "auto"  # the samplers, gpus_per_actor each (see GpuChoice)

    def validate(self) -> None:
        check_positive(self.positives_per_instance, "generate.positives_per_instance", allow_zero=True)
        check_positive(self.negatives_per_category, "generate.negatives_per_category", allow_zero=True)
        require(
            self.max_attempts >= self.positives_per_instance,
            "generate.max_attempts",
            "must be >= generate.positives_per_instance",
        )
        require(
            self.guidance_scale >= 1.0,
            "generate.guidance_scale",
            f"classifier-free guidance must be >= 1 (the paper uses 5.0), got {self.guidance_scale}",
        )
        check_positive(self.steps, "generate.steps")
        check_positive(self.num_prompts, "generate.num_prompts")
        require(
            self.image_size % 8 == 0 and self.image_size > 0, "generate.image_size", "must be a positive multiple of 8"
        )
        check_positive(self.batch_size, "generate.batch_size")
        check_positive(self.num_actors, "generate.num_actors")
        check_positive(self.gpus_per_actor, "generate.gpus_per_actor", allow_zero=True)
        check_gpu_choice(self.use_gpu, "generate.use_gpu")
        if self.prompts_file:
            require_path(
                self.prompts_file,
                Path.is_file,
                "generate.prompts_file",
                f"{self.prompts_file} does not exist; give a JSON file or leave it empty",
            )
        self._validate_prompt_source()

    def _validate_prompt_source(self) -> None:
        require(
            self.prompt_source != "file" or bool(self.prompts_file),
            "generate.prompts_file",
            "generate.prompt_source=file needs generate.prompts_file=FILE (JSON {instance_id: [prompts]})",
        )
        require(
            self.prompt_source not in ("template", "llm") or not self.prompts_file,
            "generate.prompt_source",
            f"{self.prompt_source} does not read generate.prompts_file={self.prompts_file}: clear the file or use "
            "generate.prompt_source=file",
        )


@dataclass(frozen=True)
class FilterConfig:
    """DreamSim filtering of generated images against the real photos."""

    enabled: bool = True
    dreamsim_type: str = "ensemble"
    cache_dir: str = path_field("./models/dreamsim")  # the DreamSim checkpoints (filtering/embedders.py)
    # A generated positive whose score (mean cosine similarity of its DreamSim embedding to the real photos') is
    # below this is left out when train reads it; an unscored one is kept. Every scored row stays on disk, so a new
    # threshold retrains without regenerating; generate compares with it only to know when to stop sampling.
    # The one rule: personalization/contrastive/data.py, read_positives.
    threshold: float = 0.6
    # auto = sam (the paper's PerSAM-style masking) when sam_weights is set, else patch (a logged fallback)
    masker: Literal["auto", "none", "patch", "sam"] = "auto"
    sam_weights: str = path_field()  # HF id (facebook/sam-vit-base) or local folder of a SAM checkpoint
    num_actors: int = 1
    batch_size: int = 16
    use_gpu: GpuChoice = "auto"  # the DreamSim scorers, a quarter GPU each, in generate and filter (see GpuChoice)

    def validate(self) -> None:
        check_fraction(self.threshold, "filter.threshold")
        check_positive(self.num_actors, "filter.num_actors")
        check_positive(self.batch_size, "filter.batch_size")
        check_gpu_choice(self.use_gpu, "filter.use_gpu")
        require(
            self.masker != "sam" or bool(self.sam_weights),
            "filter.sam_weights",
            "masker=sam needs filter.sam_weights (HF id or local folder of a SAM checkpoint)",
        )
