"""Contrastive LoRA fine-tuning of the backbone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from personalization.config.fields import GpuChoice, check_gpu_choice, path_field
from personalization.config.layers import check_fraction, check_positive, require, require_path


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
