"""Using the encoders: evaluation, `personalize find`, and where and how a run's Ray work goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from personalization.config.fields import GpuChoice, check_gpu_choice
from personalization.config.layers import check_positive, require, require_path


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
class RunConfig:
    """`personalize run` as a whole."""

    # Train seeds: each trains and evaluates into OUT/seed-<s>/ over the data stages made once in OUT/ with
    # `seed`; empty = one run with `seed` (pipelines/seeds.py). `personalize compare OUT` shows mean +- sd.
    seeds: tuple[int, ...] = ()

    def validate(self) -> None:
        require(len(set(self.seeds)) == len(self.seeds), "run.seeds", f"holds a seed twice: {list(self.seeds)}")
        for seed in self.seeds:
            check_positive(seed, "run.seeds", allow_zero=True)
