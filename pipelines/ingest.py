"""Stage ``ingest``: a dataset folder (PODS / Dogs / DF2 layout, or a plain folder of one object's photos) -> the
image table of real photos, validated in full before anything else runs.

    personalize ingest data.root=data/pods output_dir=outputs/pods
    personalize ingest data.root=photos/my_mug data.category=mug

Writes ``OUT/ingest/images.parquet`` (real_train + real_test rows of every instance, val and test, with masks) and
``OUT/ingest/instances.json`` = {instance_id: {"category", "split"}}. Every bad file is reported in one error.
Ingest is driver-side I/O; it needs no Ray.

Caching: the stage hash covers ``data.root`` / ``layout`` / ``category`` / ``instance_id`` / ``max_test_images``
(+ ``seed`` when subsampling) and a listing of the dataset's files (relative path, size, mtime) -- not their
bytes, which would take minutes for PODS. ``data.instances`` and ``data.max_instances`` do not filter ingest (later
stages select), so they are not hashed either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from personalization.artifacts import commit_stage
from personalization.config import ExperimentConfig
from personalization.datasets import DatasetError, dataset_listing, detect_layout, hash_listing, iter_rows, scan_dataset
from personalization.schema import IMAGE_SCHEMA, rows_to_table, validate_table
from pipelines.common import log, resolved, stage_dir, stage_main

STAGE = "ingest"
BATCH_ROWS = 128  # rows per Parquet row group: bounds memory on large datasets


def ingest_config(cfg: ExperimentConfig) -> dict:
    """What the ingest output depends on (its hash decides whether the stage is redone)."""
    data = cfg.data
    if not data.root:
        raise DatasetError("data.root is empty; pass data.root=DIR (a dataset folder or a folder of photos)")
    root = Path(data.root)
    layout = detect_layout(root, data.layout)
    return {
        "root": str(root.resolve()),
        "layout": layout,
        "category": data.category if layout == "folder" else "",
        "instance_id": data.instance_id if layout == "folder" else "",
        "max_test_images": data.max_test_images,
        "max_side": data.max_side,
        "seed": cfg.seed if data.max_test_images else None,
        "listing": hash_listing(dataset_listing(root, layout)),
    }


def _build(cfg: ExperimentConfig, layout: str, out: Path) -> int:
    data = cfg.data
    scan = scan_dataset(
        data.root,
        layout,
        category=data.category,
        instance_id=data.instance_id,
        max_test_images=data.max_test_images,
        seed=cfg.seed,
    )
    rows, batch = 0, []
    with pq.ParquetWriter(out / "images.parquet", IMAGE_SCHEMA, compression="zstd") as writer:
        for row in iter_rows(scan, max_side=data.max_side):
            batch.append(row)
            if len(batch) >= BATCH_ROWS:
                writer.write_table(validate_table(rows_to_table(batch)))
                rows, batch = rows + len(batch), []
        if batch:
            writer.write_table(validate_table(rows_to_table(batch)))
            rows += len(batch)
    scan.errors.raise_if_any()  # every problem at once; commit_stage then removes the partial output
    (out / "instances.json").write_text(json.dumps(scan.instances, indent=2, sort_keys=True))
    counts = {s: sum(v["split"] == s for v in scan.instances.values()) for s in ("val", "test", "user")}
    log.info(
        "ingest: %d images of %d instances (%s) from %s (%s layout)",
        rows,
        len(scan.instances),
        ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        data.root,
        layout,
    )
    return rows


def run(cfg: ExperimentConfig) -> Path:
    """Validate and ingest ``cfg.data`` into ``OUT/ingest/``; skipped when the dataset and settings are unchanged."""
    config = ingest_config(cfg)
    return commit_stage(
        stage_dir(cfg, STAGE),
        STAGE,
        config,
        lambda out: _build(cfg, config["layout"], out),
        resolved_config=resolved(cfg),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
