"""Typed, frozen configuration: one dataclass per stage, composed into :class:`ExperimentConfig`.

Layers, lowest first: the defaults below, an experiment YAML that holds only deltas, then ``key=value`` dotted
overrides from the command line. Every value is type-checked and every section validates itself when built, so
a bad config fails at once with the key and the fix in the message.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from personalization.artifacts import write_text_atomic
from personalization.config_layers import (
    ConfigError,
    build_dataclass,
    check_fraction,
    check_positive,
    merge,
    parse_override,
    read_yaml,
    require,
    require_path,
    skipping_path_checks,
    to_dict,
)
from personalization.synthesis.generators import GENERATORS

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "RENAMED_KEYS",
    "build_config",
    "check_not_renamed",
    "load_config",
    "parse_override",
    "path_field",
    "path_fields",
    "replace",
    "save_config",
    "to_dict",
]

# Where a stage's GPU work runs (pipelines/resources.py: wants_gpu): "auto" asks for GPUs when the cluster has
# some or its autoscaler can add a node with some, else runs on CPU; true always asks; false never does.
GpuChoice = Literal["auto", True, False]


def path_field(default: str = "", *, output: bool = False) -> Any:
    """A field naming a local file or folder (or a hub id that may be one). The CLI makes a relative value absolute
    from its working directory (Ray workers run elsewhere): an input only when it exists locally, so a hub id stays
    as given; an ``output`` always, before it exists (pipelines/common.py: absolute_paths)."""
    return field(default=default, metadata={"path": "output" if output else "input"})


def path_fields(cls: type | None = None, prefix: str = "") -> dict[str, str]:
    """{dotted key: "input" | "output"} for every :func:`path_field` of ``cls`` (default: ExperimentConfig) and
    its sections."""
    cls = ExperimentConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= path_fields(hints[f.name], f"{prefix}{f.name}.")
        elif "path" in f.metadata:
            found[f"{prefix}{f.name}"] = f.metadata["path"]
    return found


def check_gpu_choice(value: object, key: str) -> None:
    require(value == "auto" or isinstance(value, bool), key, f"must be auto, true or false, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the photos are and which instances to work on."""

    root: str = path_field()  # dataset folder (PODS / Dogs / DF2 layout) or a plain folder of one object's photos
    layout: str = "auto"  # auto (detected) or a name in LAYOUTS (personalization/datasets/layouts.py)
    category: str = ""  # plain-folder layout only: the object's category, e.g. "mug"
    instance_id: str = ""  # plain-folder layout only: a name for the object (default: the folder name)
    instances: tuple[str, ...] = ()  # instances to personalize; empty = every instance whose split is `test`
    max_instances: int = 0  # 0 = no limit; else the first N selected instances (sorted)
    max_test_images: int = 0  # 0 = all; else a seeded sample of each instance's test images per split
    max_side: int = 1024  # photos (and masks) larger than this are downscaled on ingest; 0 = keep full size
    max_pixels: int = 100_000_000  # files with more pixels are refused before decoding (a decompression-bomb guard)

    def validate(self) -> None:
        from personalization.datasets.layouts import layout_choices  # here: the datasets package loads PIL, pyarrow

        choices = layout_choices()
        require(self.layout in choices, "data.layout", f"must be one of {list(choices)}, got {self.layout!r}")
        check_positive(self.max_instances, "data.max_instances", allow_zero=True)
        check_positive(self.max_test_images, "data.max_test_images", allow_zero=True)
        check_positive(self.max_side, "data.max_side", allow_zero=True)
        check_positive(self.max_pixels, "data.max_pixels")
        if self.root:
            require_path(self.root, Path.exists, "data.root", f"{self.root} does not exist; pass data.root=DIR")

    def require_root(self) -> Path:
        """``root``, for the commands that read the dataset (ingest; run and sweep before any work); the other
        stages read OUT/ingest and need none."""
        require(
            bool(self.root),
            "data.root",
            "pass data.root=DIR (a dataset folder, e.g. PODS layout, or a folder of your object's photos)",
        )
        return Path(self.root)


@dataclass(frozen=True)
class ModelConfig:
    """The vision backbone to personalize, and its LoRA."""

    backbone: str = "dinov2_vitb14"  # a registry name: dinov2_vitb14, clip_vitb16, mae_vitb16, mobilenetv2
    weights: str = path_field()  # HF id or local folder; empty = the registry's default for the backbone
    image_size: int = 224
    eval_feature: Literal["cls", "cls+mean"] = "cls"
    lora_r: int = 16
    lora_alpha: float = 0.5
    lora_dropout: float = 0.3
    lora_targets: tuple[str, ...] = ()  # empty = the registry's default (attention q/k/v)
    train_blocks: int = 0  # CNN backbones: also train the last N blocks in full (0 = LoRA only)

    def validate(self) -> None:
        from personalization.models.registry import BACKBONES  # here, not at the top: the registry needs torch

        require(self.backbone in BACKBONES, "model.backbone", f"{self.backbone!r} is not one of {sorted(BACKBONES)}")
        check_positive(self.image_size, "model.image_size")
        check_positive(self.lora_r, "model.lora_r")
        check_positive(self.lora_alpha, "model.lora_alpha")
        require(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")
        check_positive(self.train_blocks, "model.train_blocks", allow_zero=True)


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


@dataclass(frozen=True)
class TrainConfig:
    """Contrastive LoRA fine-tuning of the backbone on (anchor, positive, negative) triplets."""

    loss: str = "infonce"  # a name in LOSSES (personalization/contrastive/losses.py): infonce, cross_entropy, ...
    temperature: float = 0.07
    margin: float = 0.05
    num_triplets: int = 4500
    num_positives: int = 0  # synthetic positives per instance to sample from; 0 = all
    num_negatives: int = 0  # negatives to sample from; 0 = all
    num_pairs: int = 0  # distinct anchor-positive pairs; 0 = unconstrained
    positive_sources: tuple[str, ...] = ("cutpaste",)  # cutpaste, dreambooth, masked_dreambooth, real, released
    # released generated positives: <instance_id>/ subfolders of images (positive source "released";
    # personalization/contrastive/released.py)
    positives_dir: str = path_field()
    # Each positive source's share of the anchor-positive pairs, e.g. {real: 1, cutpaste: 3} (one weight per entry of
    # positive_sources); empty = every positive in one pool, drawn uniformly (the plain union)
    source_weights: dict[str, float] = field(default_factory=dict)
    # auto = generated when generation is on, else the dataset's val instances of the category, else
    # negatives_dir, else the stock photos when stock_negatives (pipelines/common.py: resolve_negatives).
    negatives: Literal["auto", "val", "folder", "generated", "stock"] = "auto"
    negatives_dir: str = path_field()  # photos that do not show the object (<category>_negatives/ inside, or flat)
    stock_negatives: bool = False  # let auto fall back to generic real photos shipped with scikit-image
    learning_rate: float = 3e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 2
    augment: bool = True
    # smallest area fraction of the random resized crop (reference 0.8); lower it when the photos you search show
    # the object partly or close up (README, "Your own object")
    crop_scale: float = 0.8
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: GpuChoice = False  # the Ray Train workers; false unless asked (auto works too, see GpuChoice)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 1
    checkpoint_every: int = 0  # steps between checkpoints; 0 = once per epoch
    max_failures: int = 1

    def validate(self) -> None:
        from personalization.contrastive.losses import LOSSES  # here, not at the top: the table needs torch

        require(self.loss in LOSSES, "train.loss", f"must be one of {sorted(LOSSES)}, got {self.loss!r}")
        check_positive(self.temperature, "train.temperature")
        check_gpu_choice(self.use_gpu, "train.use_gpu")
        check_positive(self.margin, "train.margin", allow_zero=True)
        for key in ("num_triplets", "batch_size", "epochs", "num_workers"):
            check_positive(getattr(self, key), f"train.{key}")
        for key in ("num_positives", "num_negatives", "num_pairs", "checkpoint_every", "max_failures"):
            check_positive(getattr(self, key), f"train.{key}", allow_zero=True)
        check_positive(self.learning_rate, "train.learning_rate")
        check_fraction(self.beta1, "train.beta1")
        require(0 < self.crop_scale <= 1, "train.crop_scale", f"must be in (0, 1], got {self.crop_scale}")
        check_fraction(self.beta2, "train.beta2")
        require(
            self.zero_stage in (1, 2), "train.zero_stage", f"DeepSpeed ZeRO stage must be 1 or 2, got {self.zero_stage}"
        )
        allowed = ("cutpaste", "dreambooth", "masked_dreambooth", "real", "released")
        require(bool(self.positive_sources), "train.positive_sources", f"name at least one of {allowed}")
        for source in self.positive_sources:
            require(source in allowed, "train.positive_sources", f"{source!r} is not one of {allowed}")
        self._validate_positives_dir()
        self._validate_source_weights()
        if self.negatives == "folder":
            require(
                bool(self.negatives_dir),
                "train.negatives_dir",
                "negatives=folder needs train.negatives_dir=DIR holding category images",
            )
        if self.negatives_dir:
            require_path(
                self.negatives_dir,
                Path.is_dir,
                "train.negatives_dir",
                f"{self.negatives_dir} is not a folder; point it at photos that do not show your object",
            )

    def _validate_positives_dir(self) -> None:
        released = "released" in self.positive_sources
        require(
            not released or bool(self.positives_dir),
            "train.positives_dir",
            "positive source released needs train.positives_dir=DIR holding one <instance_id>/ folder of images each",
        )
        require(
            released or not self.positives_dir,
            "train.positives_dir",
            f"{self.positives_dir} is read only as positive source released: add released to train.positive_sources "
            "or clear train.positives_dir",
        )
        if self.positives_dir:
            require_path(
                self.positives_dir,
                Path.is_dir,
                "train.positives_dir",
                f"{self.positives_dir} is not a folder; point it at the released positives (<instance_id>/ inside)",
            )

    def _validate_source_weights(self) -> None:
        weights = self.source_weights
        if not weights:
            return
        require(
            set(weights) == set(self.positive_sources),
            "train.source_weights",
            f"give one weight to each of train.positive_sources {list(self.positive_sources)} and to no other "
            f"source, got {weights}",
        )
        require(
            all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0,
            "train.source_weights",
            f"weights must be >= 0 and not all 0, got {weights}",
        )


@dataclass(frozen=True)
class EvaluateConfig:
    """Pretrained vs personalized encoder on the four tasks."""

    tasks: tuple[str, ...] = ("classification", "retrieval", "detection", "segmentation")
    batch_size: int = 32
    num_actors: int = 1
    dense_image_size: int = 448  # input side for patch features (896 for /14 and 1024 for /16 in the paper)
    min_object_pixels: int = 100
    use_gpu: GpuChoice = "auto"  # the embedding actors, one GPU each (see GpuChoice)

    def validate(self) -> None:
        allowed = ("classification", "retrieval", "detection", "segmentation")
        for task in self.tasks:
            require(task in allowed, "evaluate.tasks", f"{task!r} is not one of {allowed}")
        check_positive(self.batch_size, "evaluate.batch_size")
        check_positive(self.num_actors, "evaluate.num_actors")
        check_positive(self.dense_image_size, "evaluate.dense_image_size")
        check_positive(self.min_object_pixels, "evaluate.min_object_pixels", allow_zero=True)
        check_gpu_choice(self.use_gpu, "evaluate.use_gpu")


@dataclass(frozen=True)
class RayConfig:
    """Where the Ray work runs."""

    address: str = ""  # empty = start a local single-node Ray; else "auto" or ray://host:10001
    num_cpus: int = 0  # local Ray only; 0 = all cores
    dashboard: bool = True  # local Ray only: serve the dashboard on 127.0.0.1 (port 8265, or the next free one)
    # Per-instance trainings (dreambooth, train) at once; 0 = as many as the cluster's CPUs / GPUs hold.
    max_concurrent: int = 0
    instances_per_gpu: int = 1  # trainings packed on one GPU (each worker asks for 1/N of a GPU)

    def validate(self) -> None:
        check_positive(self.num_cpus, "ray.num_cpus", allow_zero=True)
        check_positive(self.max_concurrent, "ray.max_concurrent", allow_zero=True)
        check_positive(self.instances_per_gpu, "ray.instances_per_gpu")


@dataclass(frozen=True)
class FindConfig:
    """`personalize find`: rank a folder of photos by how likely each shows the object (personalized and pretrained).

    The instances are ``data.instances`` (default: every selected instance, as for the other stages).
    """

    gallery: str = ""  # folder of photos to search, read recursively
    top_k: int = 48  # hits shown as thumbnails on OUT/find/<instance>/index.html
    batch_size: int = 32  # photos per embedding batch
    num_actors: int = 0  # embedding actors (each loads both encoders); 0 = one per GPU, else one per CPU (<= 8)
    localize: bool = False  # also a box and mask per top hit (evaluation's dense predictor, evaluate.dense_*)

    def validate(self) -> None:
        check_positive(self.top_k, "find.top_k")
        check_positive(self.batch_size, "find.batch_size")
        check_positive(self.num_actors, "find.num_actors", allow_zero=True)
        if self.gallery:
            require_path(
                self.gallery, Path.is_dir, "find.gallery", f"{self.gallery} is not a folder; pass find.gallery=DIR"
            )


@dataclass(frozen=True)
class RunConfig:
    """`personalize run` as a whole."""

    # Train seeds: each trains and evaluates into OUT/seed-<s>/ over the data stages made once in OUT/ with
    # `seed`; empty = one run with `seed` (pipelines/seeds.py). `personalize compare OUT` shows mean +- sd.
    seeds: tuple[int, ...] = ()

    def validate(self) -> None:
        require(len(set(self.seeds)) == len(self.seeds), "run.seeds", f"holds a seed twice: {list(self.seeds)}")
        for seed in self.seeds:
            check_positive(seed, "run.seeds", allow_zero=True)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = path_field("outputs/experiment", output=True)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cutpaste: CutpasteConfig = field(default_factory=CutpasteConfig)
    dreambooth: DreamboothConfig = field(default_factory=DreamboothConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    find: FindConfig = field(default_factory=FindConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """The rules that join sections (each section has checked its own values already)."""
        require(bool(self.output_dir), "output_dir", "pass output_dir=DIR")
        require(bool(self.name), "name", "give the experiment a name")
        for source in self.train.positive_sources:
            self._check_positive_source(source)
        generates_negatives = self.generate.enabled and self.generate.negatives_per_category > 0
        if self.train.negatives == "generated" and not generates_negatives:
            raise ConfigError(
                "train.negatives=generated needs generate.enabled=true and generate.negatives_per_category > 0 "
                "(or train.negatives=auto / val / folder / stock)"
            )
        self._check_generated_backgrounds()

    def _check_generated_backgrounds(self) -> None:
        cut = self.cutpaste
        if not cut.enabled or cut.background_source(self.generate.enabled) != "generated":
            return
        if self.dreambooth.base_model:
            return
        how = "=generated" if cut.backgrounds == "generated" else "=auto (generated, as generate.enabled=true)"
        raise ConfigError(
            f"cutpaste.backgrounds{how} samples backgrounds from the pretrained generator, but "
            "dreambooth.base_model is empty: set "
            "dreambooth.base_model=HF_ID_OR_FOLDER (a diffusers Stable Diffusion), or use cutpaste.backgrounds="
            "procedural, or cutpaste.backgrounds_dir=DIR (photos)"
        )

    def _check_positive_source(self, source: str) -> None:
        if source == "cutpaste" and not self.cutpaste.enabled:
            raise ConfigError("train.positive_sources has cutpaste but cutpaste.enabled=false: enable it or drop it")
        if source not in ("dreambooth", "masked_dreambooth"):
            return
        if not self.generate.enabled:
            raise ConfigError(f"train.positive_sources has {source} but generate.enabled=false: enable generation")
        made = "masked_dreambooth" if self.dreambooth.masked else "dreambooth"
        if source != made:
            raise ConfigError(
                f"train.positive_sources has {source} but dreambooth.masked={self.dreambooth.masked} makes {made} "
                "images: make them agree"
            )


# Building from layers

# Keys that were renamed: the old spelling (in a YAML, an override or a sweep space) fails naming the new one.
RENAMED_KEYS = {"generate.cfg": "generate.guidance_scale"}


def check_not_renamed(key: str) -> None:
    """A ConfigError naming the new key when ``key`` (dotted) is a renamed one."""
    if key in RENAMED_KEYS:
        new = RENAMED_KEYS[key]
        raise ConfigError(f"{key}: renamed to {new} (same meaning and values); write {new} instead")


def _dotted_keys(layer: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in layer.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


def build_config(*layers: dict) -> ExperimentConfig:
    """Defaults, then each layer of deltas in order; validated."""
    merged = to_dict(ExperimentConfig())
    for layer in layers:
        for key in _dotted_keys(layer):
            check_not_renamed(key)
        merged = merge(merged, layer)
    return build_dataclass(ExperimentConfig, merged)


def rebuild_config(*layers: dict) -> ExperimentConfig:
    """The driver's checked config (:func:`to_dict`) made again in a Ray worker or Tune trial: every rule holds
    but the existence of local files and folders, which the driver checked on its own node (data.root and the
    like need not be visible from the node a worker runs on)."""
    with skipping_path_checks():
        return build_config(*layers)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Defaults <- the YAML at ``path`` (deltas only) <- ``key=value`` overrides."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: {path} does not exist")
        try:
            delta = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        if not isinstance(delta, dict):
            raise ConfigError(f"{path}: must hold a mapping of config keys, got {type(delta).__name__}")
        layers.append(delta)
    layers.extend(parse_override(text) for text in overrides)
    return build_config(*layers)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def replace(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that also accepts dotted keys: ``replace(cfg, **{"train.epochs": 1})``."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    updated = dataclasses.replace(config, **flat)
    updated.validate()
    return updated
