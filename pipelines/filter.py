"""`personalize filter`: (re)score generated positives with DreamSim, without regenerating anything.

``personalize generate`` already scores while it generates when ``filter.enabled``; this stage is for scoring
afterwards, e.g. positives made with the filter off, or with another masker / DreamSim model. Reads
OUT/generate/positives and OUT/ingest/images.parquet; commits OUT/filter/ (the same rows, ``score`` filled) as
image-table shards. The threshold is still applied at read time (``read_image_table(min_score=...)``).
Ray Data: Parquet shards -> Scorer actor pool -> Parquet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from personalization import schema
from personalization.artifacts import commit_stage
from personalization.config import ExperimentConfig
from personalization.errors import MissingInputError
from personalization.filtering.embedders import check_dreamsim_cache
from personalization.filtering.scorer import Scorer, check_real_table
from pipelines.common import ray_session, resolved, stage_dir, stage_main
from pipelines.generate import batch_to_table, scorer_kwargs
from pipelines.resources import wants_gpu, without_placement

STAGE = "filter"
log = logging.getLogger(f"personalize.{STAGE}")


def run(cfg: ExperimentConfig) -> Path:
    positives = stage_dir(cfg, "generate", "positives")
    real = stage_dir(cfg, "ingest", "images.parquet")
    if not positives.exists() or not schema.parquet_files(positives):
        raise MissingInputError(f"{positives} holds no generated images; run `personalize generate` first")
    check_dreamsim_cache(cfg.filter.cache_dir, cfg.filter.dreamsim_type)
    ids = schema.read_image_table(positives, columns=["instance_id"]).column("instance_id").to_pylist()
    check_real_table(real, set(ids))
    stage_config = {"filter": {k: v for k, v in without_placement(cfg.filter).items() if k != "threshold"}}

    def build(tmp_dir: Path) -> int:
        files = [str(f) for f in schema.parquet_files(positives)]
        with ray_session(cfg):
            import ray

            dataset = ray.data.read_parquet(files)
            dataset = dataset.map_batches(
                Scorer,
                fn_constructor_kwargs=scorer_kwargs(cfg),
                batch_size=cfg.filter.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=cfg.filter.num_actors),
                num_gpus=0.25 if wants_gpu(cfg, STAGE) else 0.0,
            )
            dataset = dataset.map_batches(batch_to_table, batch_size=cfg.filter.batch_size, batch_format="numpy")
            dataset.write_parquet(str(tmp_dir), compression="zstd")
        return schema.read_image_table(tmp_dir, columns=["image_id"]).num_rows

    inputs = {"generate": positives, "ingest": stage_dir(cfg, "ingest")}
    return commit_stage(stage_dir(cfg, STAGE), STAGE, stage_config, build, inputs=inputs, resolved_config=resolved(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)
