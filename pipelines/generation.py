"""The generation stream, shared by `personalize generate` and Cut-and-Paste's generated backgrounds: rows ->
ImageSampler actor pool (-> DreamSim Scorer actor pool) -> Parquet shards, or each batch to the caller.

Its GPU asks follow ``generate.use_gpu`` (samplers) and ``filter.use_gpu`` (scorers); its log lines and the
dashboard's filter counters are the generate stage's.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from personalization import schema
from personalization.config import ExperimentConfig
from pipelines.metrics import record_filter_batch
from pipelines.resources import cluster_capacity, wants_gpu

STAGE = "generate"  # whose GPU setting, log and metrics the stream uses
log = logging.getLogger(f"personalize.{STAGE}")


def scorer_gpus(cfg: ExperimentConfig, sampler_gpus: float) -> float:
    """A quarter GPU per DreamSim scorer when ``filter.use_gpu`` asks for GPUs; under ``auto``, the scorers run on
    CPU when the samplers fill every GPU the cluster can hold (counting the nodes its autoscaler can add)."""
    if not wants_gpu(cfg, "filter"):
        return 0.0
    if cfg.filter.use_gpu == "auto" and sampler_gpus:
        free = cluster_capacity().get("GPU", 0) - cfg.generate.num_actors * sampler_gpus
        if free < 0.25 * cfg.filter.num_actors:
            log.warning("generate: no GPU left for the DreamSim scorers (set generate.gpus_per_actor=0.5 to share)")
            return 0.0
    return 0.25


def _sampler_kwargs(cfg: ExperimentConfig) -> dict:
    return {
        "base_model": cfg.dreambooth.base_model,
        "generator_type": cfg.dreambooth.generator_type,
        "steps": cfg.generate.steps,
        "image_size": cfg.generate.image_size,
        "scheduler": cfg.generate.scheduler,
    }


def run_generation(
    cfg: ExperimentConfig,
    rows: list[dict],
    out_dir: Path,
    *,
    base_model: str,
    scorer_kwargs: dict | None = None,
    needed: dict[str, int] | None = None,
    sink: Callable[[pa.Table], None] | None = None,
) -> int:
    """Rows -> images (-> scores) -> Parquet shards in ``out_dir`` (or each batch to ``sink``); returns the rows.

    ``needed`` (with a scorer): stop the stream once each instance has that many rows scoring >= the threshold.
    ``sink``: the stream's batches, in order, as schema-typed tables (the caller commits per instance).
    """
    import ray

    from personalization.synthesis.sampler import ImageSampler

    gen = cfg.generate
    gpus = gen.gpus_per_actor if wants_gpu(cfg, STAGE) else 0
    # Both actor pools must fit beside the small tasks that feed and write them, or the stream stalls (2-CPU box).
    actors = gen.num_actors + (cfg.filter.num_actors if scorer_kwargs is not None else 0)
    cpus = min(1.0, ray.cluster_resources().get("CPU", 1) / (actors + 1))
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / gen.batch_size)))
    dataset = dataset.map_batches(
        ImageSampler,
        fn_constructor_kwargs={**_sampler_kwargs(cfg), "base_model": base_model},
        compute=ray.data.ActorPoolStrategy(size=gen.num_actors),
        num_gpus=gpus,
        num_cpus=cpus,
        batch_size=gen.batch_size,
        batch_format="numpy",
    )
    if scorer_kwargs is not None:
        from personalization.filtering.scorer import Scorer

        dataset = dataset.map_batches(
            Scorer,
            fn_constructor_kwargs=scorer_kwargs,
            batch_size=cfg.filter.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.filter.num_actors),
            num_cpus=cpus,
            num_gpus=scorer_gpus(cfg, gpus),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if needed is None and sink is None:
        # Distributed write; all-null columns (mask, unscored score) land as Arrow nulls, cast on read.
        dataset.write_parquet(str(out_dir), compression="zstd")
        return schema.read_image_table(out_dir, columns=["image_id"]).num_rows
    from personalization.filtering.scorer import take_until_accepted

    batches = dataset.iter_batches(batch_size=gen.batch_size, batch_format="numpy")
    written, seen, accepted, warned = 0, Counter(), Counter(), set()
    for index, batch in enumerate(take_until_accepted(batches, needed, cfg.filter.threshold) if needed else batches):
        table = schema.batch_to_table(batch)
        if sink is not None:
            sink(table)
            rows = table.num_rows
        else:
            rows = schema.write_image_table(table, out_dir / f"part-{index:05d}.parquet")
        scores = [s for s in batch["score"] if s is not None]
        record_filter_batch(rows, sum(s >= cfg.filter.threshold for s in scores), stage=STAGE)
        written += rows
        for instance_id, score in zip(batch["instance_id"], batch["score"], strict=True):
            if score is not None:
                seen[str(instance_id)] += 1
                accepted[str(instance_id)] += float(score) >= cfg.filter.threshold
        warned |= warn_low_acceptance(cfg, seen, accepted, warned)
    return written


def warn_low_acceptance(cfg: ExperimentConfig, seen: Counter, accepted: Counter, warned: set[str]) -> set[str]:
    """Say once per instance, while it streams, that the filter rejects nearly everything (and what to change)."""
    from personalization.filtering.scorer import low_acceptance

    low = {i: r for i, r in low_acceptance(seen, accepted).items() if i not in warned}
    for instance_id, rate in low.items():
        log.warning(
            "generate: the filter accepted %d of %d images of %s (%.1f%%, threshold %.2f); at this rate it ends at "
            "generate.max_attempts=%d short of positives. The generator may not have learned the object: raise "
            "dreambooth.steps or dreambooth.learning_rate (now %g, mode %s), or lower filter.threshold",
            accepted[instance_id], seen[instance_id], instance_id, 100 * rate, cfg.filter.threshold,
            cfg.generate.max_attempts, cfg.dreambooth.effective_learning_rate, cfg.dreambooth.mode,
        )  # fmt: skip
    return set(low)
