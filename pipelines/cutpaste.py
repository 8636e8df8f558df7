"""`personalize cutpaste`: Cut-and-Paste positives for the selected instances (and same-category val instances).

Reads OUT/ingest (images.parquet, instances.json), commits OUT/cutpaste/ as image-table Parquet shards. The work
is a Ray Data pipeline of plain tasks: (instance_id, k) work items -> ``map_batches`` calling the library's
``make_composite`` -> ``write_parquet``. The real rows and the encoded backgrounds travel to the tasks as two
object refs, so workers on other nodes need no shared filesystem.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image

from personalization import schema
from personalization.artifacts import commit_stage, is_current, read_manifest
from personalization.config import ExperimentConfig, to_dict
from personalization.errors import MissingInputError, UserError
from personalization.synthesis.backgrounds import load_backgrounds, make_procedural_backgrounds
from personalization.synthesis.cutpaste import composite_options, make_composite
from pipelines import common
from pipelines.common import ray_session, resolved, stage_dir, stage_main

STAGE = "cutpaste"
PROCEDURAL_BACKGROUNDS = 64  # scenes in the procedural set when no background folder is given
BATCH_SIZE = 8  # composites per Ray task call
log = logging.getLogger(f"personalize.{STAGE}")


def select_instances(cfg: ExperimentConfig, instances: dict[str, dict]) -> list[str]:
    """The instances to composite: the chosen ones (``data.instances``, else every ``test``/``user`` instance,
    capped at ``data.max_instances``), plus every val instance of their categories when ``include_val``."""
    chosen = common.select_instances(cfg, instances)
    if cfg.cutpaste.include_val:
        categories = {instances[i]["category"] for i in chosen}
        chosen += [i for i, info in instances.items() if info["split"] == "val" and info["category"] in categories]
    return sorted(set(chosen))


def _load_real_rows(images_path: Path, instance_ids: list[str]) -> pa.Table:
    """The masked real_train rows of ``instance_ids``; fails before any Ray work if an instance has none."""
    table = schema.read_image_table(images_path, role="real_train", instance_id=instance_ids)
    table = table.filter(pc.is_valid(table["mask"]))
    have = set(table["instance_id"].to_pylist())
    missing = [i for i in instance_ids if i not in have]
    if missing:
        raise UserError(
            f"{images_path}: instances {missing} have no masked train image, and Cut-and-Paste pastes the masked "
            "object. Provide masks as train_masks/<instance>/<photo stem>.png (white object on black) beside "
            "train/<instance>/ and re-run `personalize ingest`, or set cutpaste.enabled=false."
        )
    return table


def _encoded_backgrounds(cfg: ExperimentConfig) -> tuple[list[bytes], str]:
    """PNG bytes of the background set, and the key naming it (part of every image id)."""
    size = cfg.cutpaste.image_size
    if cfg.cutpaste.backgrounds_dir:
        folder = Path(cfg.cutpaste.backgrounds_dir).resolve()
        images, key = load_backgrounds(folder, max_side=2 * size), f"folder:{folder}"
    else:
        images = make_procedural_backgrounds(PROCEDURAL_BACKGROUNDS, size, cfg.seed)
        key = f"procedural:{cfg.seed}:{PROCEDURAL_BACKGROUNDS}"
    return [schema.encode_png(image) for image in images], key


class _DecodedOnAccess(Sequence):
    """A list of PNG bytes seen as a list of PIL images, decoding only the ones a composite draws."""

    def __init__(self, blobs: Sequence[bytes]):
        self.blobs = blobs

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> Image.Image:
        return schema.decode_image(self.blobs[index])


def _composite_batch(
    batch: dict[str, np.ndarray],
    *,
    real_ref,
    backgrounds_ref,
    seed: int,
    backgrounds_key: str,
    options: dict,
) -> pa.Table:
    """Ray task body: work items {instance_id, k} -> image-table rows (bytes, never PIL), typed as the schema."""
    real, backgrounds = ray.get(real_ref), _DecodedOnAccess(ray.get(backgrounds_ref))
    wanted = sorted(set(batch["instance_id"].tolist()))
    by_instance: dict[str, list[dict]] = {i: [] for i in wanted}
    for row in real.filter(pc.is_in(real["instance_id"], pa.array(wanted))).to_pylist():
        by_instance[row["instance_id"]].append(row)
    rows = [
        make_composite(
            by_instance[str(instance_id)],
            backgrounds,
            k=int(k),
            seed=seed,
            backgrounds_key=backgrounds_key,
            **options,
        )
        for instance_id, k in zip(batch["instance_id"], batch["k"], strict=True)
    ]
    return schema.rows_to_table(rows)


def run(cfg: ExperimentConfig) -> Path:
    """Composite every selected instance; each instance commits ``OUT/cutpaste/<instance>/`` on its own as soon
    as its composites are in, so a crash keeps the finished instances and adding one redoes only it."""
    ingest = stage_dir(cfg, "ingest")
    images_path = ingest / "images.parquet"
    instances = common.load_instances(cfg)
    if not images_path.is_file():
        raise MissingInputError(f"{images_path} does not exist; run `personalize ingest` first")
    instance_ids = select_instances(cfg, instances)
    n = cfg.cutpaste.images_per_instance if cfg.cutpaste.enabled else 0
    real = _load_real_rows(images_path, instance_ids) if n else None
    out = stage_dir(cfg, STAGE)
    _drop_single_unit_layout(out)
    inputs = {"ingest": ingest}
    if cfg.cutpaste.backgrounds_dir:
        inputs["backgrounds"] = Path(cfg.cutpaste.backgrounds_dir)
    configs = {i: {"cutpaste": to_dict(cfg.cutpaste), "seed": cfg.seed, "instance": i} for i in instance_ids}
    todo = [i for i in instance_ids if not is_current(out / i, STAGE, configs[i], inputs)]
    log.info("cutpaste: %d of %d instance(s) to composite", len(todo), len(instance_ids))
    if not todo:
        return out
    if n == 0:
        log.info("cutpaste: disabled or 0 images per instance; committing empty tables")
    blobs, backgrounds_key = _encoded_backgrounds(cfg) if n else ([], "")
    pending: dict[str, list[pa.Table]] = {i: [] for i in todo}

    def commit(instance_id: str) -> None:
        table = pa.concat_tables(pending.pop(instance_id)) if n else schema.IMAGE_SCHEMA.empty_table()
        if table.num_rows != n or pc.count_distinct(table["image_id"]).as_py() != n:
            raise RuntimeError(f"cutpaste {instance_id}: {table.num_rows} rows, expected {n} distinct ids")
        path = f"{instance_id}.parquet"
        build = lambda tmp: schema.write_image_table(table, tmp / path)  # noqa: E731
        commit_stage(
            out / instance_id, STAGE, configs[instance_id], build, inputs=inputs, resolved_config=resolved(cfg)
        )

    if n == 0:
        for instance_id in todo:
            commit(instance_id)
        return out
    with ray_session(cfg):
        for batch in _composite_stream(cfg, todo, n, real, blobs, backgrounds_key):
            for instance_id in sorted(set(batch["instance_id"].to_pylist())):
                pending[instance_id].append(batch.filter(pc.equal(batch["instance_id"], instance_id)))
                if sum(t.num_rows for t in pending[instance_id]) >= n:
                    commit(instance_id)
    if pending:
        raise RuntimeError(f"cutpaste: the stream ended before {sorted(pending)} had {n} composites each")
    log.info("cutpaste: committed %d instance(s) under %s", len(todo), out)
    return out


def _composite_stream(cfg: ExperimentConfig, todo: list[str], n: int, real: pa.Table, blobs: list[bytes], key: str):
    """Composite tables as Ray Data makes them (streaming: the driver holds only the instances in flight)."""
    items = [{"instance_id": i, "k": k} for i in todo for k in range(n)]
    log.info(
        "cutpaste: %d composites (%d instances x %d) on %d backgrounds (%s), %d px",
        len(items), len(todo), n, len(blobs), key, cfg.cutpaste.image_size,
    )  # fmt: skip
    real_ref, backgrounds_ref = ray.put(real.filter(pc.is_in(real["instance_id"], pa.array(todo)))), ray.put(blobs)
    dataset = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / BATCH_SIZE)))
    dataset = dataset.map_batches(
        _composite_batch,
        batch_size=BATCH_SIZE,
        batch_format="numpy",
        fn_kwargs={
            "real_ref": real_ref,
            "backgrounds_ref": backgrounds_ref,
            "seed": cfg.seed,
            "backgrounds_key": key,
            "options": composite_options(cfg.cutpaste),
        },
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield schema.validate_table(batch, where="cutpaste batch")


def _drop_single_unit_layout(out: Path) -> None:
    """Older runs committed OUT/cutpaste as one unit (a manifest at its top): replace it by per-instance units."""
    if read_manifest(out) is not None:
        log.info("cutpaste: %s holds the one-unit layout of an older run; rebuilding it per instance", out)
        shutil.rmtree(out)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)
