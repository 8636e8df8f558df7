"""`personalize filter`: (re)score generated positives with DreamSim, without regenerating anything.

``personalize generate`` already scores while it generates when ``filter.enabled``; this stage is for scoring
afterwards, e.g. positives made with the filter off, or with another masker / DreamSim model. Reads
OUT/generate/positives/<instance>/ and OUT/ingest/images.parquet; commits OUT/filter/<instance>/ (the same rows,
``score`` filled) per instance, each with its own manifest whose ``generate`` input is the hash of the positives it
scored. ``personalize train`` reads OUT/filter/<instance> instead of the generated positives while that hash still
matches them (pipelines/train.py: positives_paths), and applies ``filter.threshold`` when it reads
(personalization/contrastive/data.py: read_positives, the one rule); the threshold is not part of this stage's
hash, so changing it never rescores. Ray Data: Parquet shards -> Scorer actor pool -> Parquet (scratch), then one
commit per instance.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import ray

from personalization import schema
from personalization.artifacts import commit_stage, is_current, read_manifest
from personalization.config import ExperimentConfig
from personalization.errors import MissingInputError
from personalization.filtering.embedders import check_dreamsim_cache
from personalization.filtering.scorer import Scorer, check_real_table
from pipelines import common
from pipelines.common import ray_session, resolved, scorer_kwargs, stage_dir, stage_main
from pipelines.instances import without_failed
from pipelines.resources import wants_gpu, without_placement

STAGE = "filter"
log = logging.getLogger(f"personalize.{STAGE}")


def instances_to_score(cfg: ExperimentConfig, positives: Path) -> list[str]:
    """The selected instances (less those failed upstream); each must have committed generated positives."""
    instance_ids = without_failed(cfg, STAGE, common.select_instances(cfg, common.load_instances(cfg)))
    missing = [i for i in instance_ids if read_manifest(positives / i) is None]
    if missing:
        raise MissingInputError(
            f"{positives} holds no committed positives for {missing}; run `personalize generate` first"
        )
    return instance_ids


def run(cfg: ExperimentConfig) -> Path:
    positives = stage_dir(cfg, "generate", "positives")
    instance_ids = instances_to_score(cfg, positives)
    check_dreamsim_cache(cfg.filter.cache_dir, cfg.filter.dreamsim_type)
    check_real_table(stage_dir(cfg, "ingest", "images.parquet"), set(instance_ids))
    out = stage_dir(cfg, STAGE)
    if read_manifest(out) is not None:  # an older run committed every instance as one unit
        log.info("filter: %s holds the one-unit layout of an older run; rescoring it per instance", out)
        shutil.rmtree(out)
    scoring = {k: v for k, v in without_placement(cfg.filter).items() if k != "threshold"}
    configs = {i: {"filter": scoring, "instance": i} for i in instance_ids}
    inputs = {i: {"generate": positives / i, "ingest": stage_dir(cfg, "ingest")} for i in instance_ids}
    todo = [i for i in instance_ids if not is_current(out / i, STAGE, configs[i], inputs[i])]
    log.info("filter: %d of %d instance(s) to score", len(todo), len(instance_ids))
    if not todo:
        return out
    for leftover in out.glob(".scratch-*"):  # a killed run's (this run holds output_dir's lock)
        shutil.rmtree(leftover, ignore_errors=True)
    scratch = out / f".scratch-{os.getpid()}"
    try:
        score_to(cfg, [f for i in todo for f in schema.parquet_files(positives / i)], scratch)
        for instance_id in todo:  # the driver holds one instance's rows at a time
            commit_stage(
                out / instance_id,
                STAGE,
                configs[instance_id],
                lambda tmp, i=instance_id: schema.write_image_table(
                    schema.read_image_table(scratch, instance_id=i), tmp / f"{i}.parquet"
                ),
                inputs=inputs[instance_id],
                resolved_config=resolved(cfg),
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def score_to(cfg: ExperimentConfig, files: list[Path], scratch: Path) -> None:
    """Score the rows of ``files`` with a pool of DreamSim actors into Parquet shards under ``scratch``."""
    scratch.mkdir(parents=True, exist_ok=True)
    if not schema.read_image_table(files, columns=["image_id"]).num_rows:
        return
    with ray_session(cfg):
        dataset = ray.data.read_parquet([str(f) for f in files])
        dataset = dataset.map_batches(
            Scorer,
            fn_constructor_kwargs=scorer_kwargs(cfg),
            batch_size=cfg.filter.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.filter.num_actors),
            num_gpus=0.25 if wants_gpu(cfg, STAGE) else 0.0,
        )
        dataset = dataset.map_batches(schema.batch_to_table, batch_size=cfg.filter.batch_size, batch_format="numpy")
        dataset.write_parquet(str(scratch), compression="zstd")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)
