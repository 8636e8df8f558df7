"""Stage ``ingest``: a dataset folder (PODS / Dogs / DF2 layout, or a plain folder of one object's photos) -> the
image table of real photos, validated in full before anything else runs.

    personalize ingest data.root=data/pods output_dir=outputs/pods
    personalize ingest data.root=photos/my_mug data.category=mug

Writes ``OUT/ingest/images.parquet`` (real_train + real_test rows of every instance, val and test, with masks) and
``OUT/ingest/instances.json`` = {instance_id: {"category", "split"}}. Every bad file is reported in one error.
In a plain folder, a photo without a mask in ``masks/`` gets one derived by GrabCut from a central box, or from
its box in ``boxes.json`` (``{"<stem>": [x0, y0, x1, y1]}``); ``OUT/ingest/derived_masks.json`` lists them (file,
box, where the box came from) for the log and the report.
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
from PIL import Image

from personalization.artifacts import commit_stage
from personalization.config import ExperimentConfig
from personalization.datasets import DatasetError, dataset_listing, detect_layout, hash_listing, iter_rows, scan_dataset
from personalization.datasets.automask import BOXES_FILE, load_boxes, segment_object
from personalization.datasets.layouts import ImageEntry
from personalization.schema import (
    IMAGE_SCHEMA,
    ROW_GROUP_ROWS,
    decode_image,
    encode_mask,
    make_image_id,
    rows_to_table,
    validate_table,
)
from pipelines.common import log, resolved, stage_dir, stage_main

STAGE = "ingest"
BATCH_ROWS = ROW_GROUP_ROWS  # rows per Parquet row group: bounds memory on large datasets


def ingest_config(cfg: ExperimentConfig) -> dict:
    """What the ingest output depends on (its hash decides whether the stage is redone)."""
    data = cfg.data
    root = data.require_root()
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
        # Plain folders: photos without a mask get a derived one (from boxes.json when it gives their box).
        "derive_masks": {"boxes": {k: list(v) for k, v in load_boxes(root).items()}} if layout == "folder" else None,
    }


def _display_size(path: Path) -> tuple[int, int]:
    """(width, height) of a photo as shown (EXIF rotation applied), from its header only."""
    with Image.open(path) as image:
        width, height = image.size
        rotated = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (height, width) if rotated else (width, height)


def derive_missing_masks(rows: list[dict], entries: dict[str, ImageEntry], boxes: dict) -> list[dict]:
    """Give every train row without a mask one derived by GrabCut (personalization/datasets/automask.py), in
    place; returns one record per derived mask (file, box in the row's pixels, where the box came from)."""
    records = []
    for row in rows:
        entry = entries.get(row["image_id"])
        if row["mask"] is not None or row["role"] != "real_train" or entry is None:
            continue
        box = boxes.get(entry.path.stem)
        if box is not None:  # boxes.json is in the photo's own pixels; the row may be downscaled (data.max_side)
            scale = row["width"] / _display_size(entry.path)[0]
            box = tuple(v * scale for v in box)
        derived = segment_object(decode_image(row["image"]), box)
        row["mask"] = encode_mask(derived.mask)
        records.append(
            {
                "instance_id": row["instance_id"],
                "image_id": row["image_id"],
                "file": entry.relpath,
                "box": [round(v, 1) for v in derived.box],
                "box_from": derived.box_from,
                "fallback": derived.fallback,
            }
        )
    return records


def _check_boxes(boxes: dict, scan, root: Path) -> None:
    stems = {e.path.stem for e in scan.entries}
    unknown = sorted(set(boxes) - stems)
    if unknown:
        raise DatasetError(
            f"{root / BOXES_FILE}: {unknown} name no photo in {root}; key each box by its photo's file stem"
        )


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
    derive = layout == "folder"
    boxes = load_boxes(data.root) if derive else {}
    if derive:
        _check_boxes(boxes, scan, Path(data.root))
    entries = {make_image_id("real", e.relpath): e for e in scan.entries}
    rows, batch, derived = 0, [], []
    with pq.ParquetWriter(out / "images.parquet", IMAGE_SCHEMA, compression="zstd") as writer:
        for row in iter_rows(scan, max_side=data.max_side, max_pixels=data.max_pixels):
            batch.append(row)
            if len(batch) >= BATCH_ROWS:
                derived += derive_missing_masks(batch, entries, boxes) if derive else []
                writer.write_table(validate_table(rows_to_table(batch)))
                rows, batch = rows + len(batch), []
        if batch:
            derived += derive_missing_masks(batch, entries, boxes) if derive else []
            writer.write_table(validate_table(rows_to_table(batch)))
            rows += len(batch)
    scan.errors.raise_if_any()  # every problem at once; commit_stage then removes the partial output
    if derived:
        (out / "derived_masks.json").write_text(json.dumps(derived, indent=2))
        log.info(
            "ingest: derived %d mask(s) with GrabCut for photos without one in masks/ (%s); check them in the "
            "report, or add masks/<stem>.png (a user's mask always wins) or a box in %s",
            len(derived),
            ", ".join(
                f"{r['file']} from {r['box_from']}" + (" (FAILED: the box is the mask)" if r["fallback"] else "")
                for r in derived
            ),  # fmt: skip
            BOXES_FILE,
        )
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
