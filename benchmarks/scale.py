"""`scale`: ``personalize run`` wall time for 1, 2 and 4 instances of one category on the toy benchmark.

Every run starts from an empty output folder (ingest, cutpaste, train, evaluate; no generator) with small
settings: MobileNetV2 (ImageNet weights) + LoRA at ``size`` px, a few dozen triplets, one epoch. Ray is started
once before any timing and shared by the runs. Cost per instance = wall / instances; the headline is the cost
per instance at the largest count over the cost at one instance: at or below 1.0 means the cost per instance
does not grow (shared val negatives, one evaluation actor pool for all encoders, trainings side by side).
The largest count is also run with ``ray.max_concurrent=1`` (one training at a time), so the gain from running
per-instance trainings concurrently is measured in the same command.
"""

from __future__ import annotations

from benchmarks.common import Result, local_ray, ratio, scratch, timed


def measure(
    counts: tuple[int, ...] = (1, 2, 4), size: int = 64, triplets: int = 32, one_at_a_time: bool = True
) -> Result:
    from personalization.config import build_config
    from personalization.datasets import make_toy
    from pipelines import run as run_stage

    out = scratch("scale")
    root = make_toy(
        out / "toy", seed=0, categories=["mug"], val_per_category=1, test_per_category=max(counts),
        test_per_split=1, dense_per_instance=1, size=size,
    )  # fmt: skip
    walls = {}
    sequential = f"{max(counts)}, one training at a time"
    with local_ray():
        for count in (*counts, sequential) if one_at_a_time else counts:
            cfg = build_config(
                {
                    "output_dir": str(out / f"run-{count}".replace(" ", "_").replace(",", "")),
                    "data": {"root": str(root), "max_instances": count if isinstance(count, int) else max(counts)},
                    "ray": {"max_concurrent": 0 if isinstance(count, int) else 1},
                    "model": {"backbone": "mobilenetv2", "image_size": size},
                    "cutpaste": {"images_per_instance": 16, "image_size": size},
                    "train": {"num_triplets": triplets, "batch_size": 16, "epochs": 1},
                    "evaluate": {"dense_image_size": size, "batch_size": 16},
                }
            )
            _, walls[count] = timed(lambda cfg=cfg: run_stage.run(cfg))
    first, last = counts[0], counts[-1]
    result = Result("scale", f"cost per instance at {last} / at {first} instance(s) (<= 1 is flat)", 0.0, goal=None)
    for count in counts:
        result.add(f"personalize run, {count} instance(s): wall", walls[count], "s")
        result.add(f"personalize run, {count} instance(s): per instance", walls[count] / count, "s")
    if len(counts) > 1:
        result.add("marginal cost of one more instance", (walls[last] - walls[first]) / (last - first), "s")
    if one_at_a_time:
        result.add(f"personalize run, {sequential}: wall", walls[sequential], "s")
        result.add(f"concurrent / one at a time, wall at {last}", walls[last] / walls[sequential], "")
    result.notes.append(
        f"toy benchmark, 1 category ({max(counts)} test + 1 val instances), {size} px, MobileNetV2 + LoRA, "
        f"{triplets} triplets, 16 composites per instance; fresh output folder per run, one Ray for all"
    )
    result.ratio = ratio(walls[last] / last, walls[first] / first)
    return result
