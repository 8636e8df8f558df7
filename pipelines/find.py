"""`personalize find`: rank a folder of photos by how likely each shows the object, personalized vs pretrained.

For each selected instance (``data.instances``, default every selected instance) with an adapter in
``OUT/train/<instance>/``, one Ray Data pass streams the gallery's file paths (never the images) through a pool of
:class:`GalleryEmbedActor` s, each holding the personalized encoder and its pretrained twin (one GPU per actor when
the cluster has GPUs). An actor reads and hashes each file and embeds it only under the encoders whose cache lacks
that hash; the driver appends new embeddings to the cache as they stream in. The object's own photos (ingest's
real train rows) travel through the same pass, so both encoders' references come from the same code.
Scores are then computed shard by shard from the cache: the max cosine to the object's photos, as evaluation's
classification scores test images. Writes, per instance, ``OUT/find/<instance>/``:

- ``results.csv``: ``rank, path, score, pretrained_score, pretrained_rank, sha256``, sorted by ``score``;
- ``index.html``: the top ``find.top_k`` hits of each encoder as thumbnails, both scores and ranks on each;
- ``skipped.csv``: ``path, reason`` of every file that is not a readable photo (never fatal);
- ``summary.json``: counts (photos, skipped, embedded now per encoder, from cache) and seconds; ``config.yaml``;
- with ``find.localize=true``, for each top hit: evaluation's dense predictor (``evaluate.dense_image_size``,
  ``evaluate.min_object_pixels``) run as one Ray task adds ``box`` (x0,y0,x1,y1 fractions), ``box_score`` and
  ``mask`` (``masks/hit_<rank>.png``) to results.csv, and draws them on the page's thumbnails.

``OUT/find/cache/<encoder identity>/part-*.parquet`` holds the embeddings (see personalization.gallery), so a
re-run on a grown gallery embeds only new or changed files, and the pretrained embeddings serve every instance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import yaml

from personalization.artifacts import write_text_atomic
from personalization.errors import MissingInputError, UserError
from personalization.find_page import make_thumbnail, render_find_page
from personalization.gallery import RESULT_COLUMNS, EmbeddingCache, embed_items, format_csv, list_gallery, rank_rows
from personalization.personal_encoder import encoder_identity, load_encoder, load_reference_bytes, localize
from personalization.schema import encode_mask
from pipelines import common
from pipelines.common import ray_session, resolved, stage_dir, stage_main
from pipelines.resources import cluster_has_gpu

STAGE = "find"
ENCODERS = ("personalized", "pretrained")
LOCALIZE_COLUMNS = ("box", "box_score", "mask")
log = logging.getLogger(f"personalize.{STAGE}")


class GalleryEmbedActor:
    """Ray Data actor: both encoders of one instance, loaded once; rows ``path`` / ``png`` -> hashes + embeddings
    (:func:`personalization.gallery.embed_items`). ``known``: {encoder name: hashes already cached} (an object ref)."""

    def __init__(self, adapter_dir: str, known, batch_size: int):
        personalized = load_encoder(adapter_dir, batch_size=batch_size)
        self.encoders = {"personalized": personalized, "pretrained": personalized.pretrained()}
        self.known = ray.get(known) if isinstance(known, ray.ObjectRef) else known

    def __call__(self, batch: dict) -> dict:
        found = embed_items(self.encoders, self.known, [str(p) for p in batch["path"]], list(batch["png"]))
        return {key: _object_array(values) for key, values in found.items()}


def _object_array(values: list):
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


MAX_CPU_ACTORS = 8  # each actor holds two encoders in memory


def _actors(cfg) -> tuple[int, float]:
    """(pool size, GPUs per actor): ``find.num_actors``, or by default one actor per GPU when the cluster has GPUs,
    else one single-threaded actor per CPU (up to MAX_CPU_ACTORS; measured: 2 actors on 2 cores embed 1.7x faster
    than one)."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        return cfg.find.num_actors or gpus, 1.0
    return cfg.find.num_actors or max(1, min(cpus, MAX_CPU_ACTORS)), 0.0


def embed_gallery(cfg, adapter: Path, items: list[dict], caches: dict[str, EmbeddingCache]) -> dict:
    """One streaming pass over ``items``; new embeddings go to ``caches``. Returns hashes, errors and counts."""
    known = {name: cache.known() for name, cache in caches.items()}
    size, gpus = _actors(cfg)
    dataset = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.find.batch_size)))
    dataset = dataset.map_batches(
        GalleryEmbedActor,
        fn_constructor_kwargs={"adapter_dir": str(adapter), "known": ray.put(known), "batch_size": cfg.find.batch_size},
        compute=ray.data.ActorPoolStrategy(size=size),
        batch_size=cfg.find.batch_size,
        batch_format="numpy",
        num_gpus=gpus,
    )
    seen = {"photos": [], "skipped": [], "references": {}, "embedded": dict.fromkeys(ENCODERS, 0)}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for k, path in enumerate(batch["path"]):
            sha, error = str(batch["sha256"][k]), str(batch["error"][k])
            if error:
                seen["skipped"].append((str(path), error))
                continue
            if path:
                seen["photos"].append((str(path), sha))
            for name in ENCODERS:
                if batch[name][k]:
                    caches[name].add(sha, batch[name][k])
                    seen["embedded"][name] += bool(path)  # gallery photos only; references are counted apart
    for cache in caches.values():
        cache.flush()
    return seen


def find_instance(cfg, instance: str, photos: list[Path], listed_skips: list[tuple[str, str]]) -> Path:
    """Rank ``photos`` for ``instance``; writes OUT/find/<instance>/ and returns its index.html."""
    started = time.time()
    adapter = stage_dir(cfg, "train", instance)
    out = stage_dir(cfg, STAGE, instance)
    caches = {name: EmbeddingCache(stage_dir(cfg, STAGE, "cache"), encoder_identity(adapter, name == "pretrained"))
              for name in ENCODERS}  # fmt: skip
    pngs = load_reference_bytes(adapter)
    references = [hashlib.sha256(png).hexdigest() for png in pngs]
    items = [{"path": str(p), "png": b""} for p in photos] + [{"path": "", "png": png} for png in pngs]
    seen = embed_gallery(cfg, adapter, items, caches)
    skipped = listed_skips + seen["skipped"]
    shas = {sha for _path, sha in seen["photos"]}
    scores = {name: cache.score(shas, cache.vectors(references)) for name, cache in caches.items()}
    rows = rank_rows(seen["photos"], scores["personalized"], scores["pretrained"])
    located = _localize(cfg, adapter, rows[: cfg.find.top_k], out) if cfg.find.localize else {}
    write_outputs(cfg, instance, out, rows, skipped, located)
    summary = {
        "instance": instance,
        "gallery": str(cfg.find.gallery),
        "photos": len(rows),
        "skipped": len(skipped),
        "embedded": seen["embedded"],
        "from_cache": {name: len(rows) - count for name, count in seen["embedded"].items()},
        "located": len(located),
        "seconds": round(time.time() - started, 3),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    log.info("find %s: %d photos ranked (embedded now: %d personalized, %d pretrained; the rest from cache), "
             "%d skipped, %.1f s", instance, len(rows), seen["embedded"]["personalized"],
             seen["embedded"]["pretrained"], len(skipped), summary["seconds"])  # fmt: skip
    log.info("find %s: open %s", instance, out / "index.html")
    return out / "index.html"


def write_outputs(cfg, instance: str, out: Path, rows: list[dict], skipped: list, located: dict) -> None:
    """results.csv, skipped.csv, index.html and config.yaml, each written whole (temporary file, rename)."""
    columns = RESULT_COLUMNS + (LOCALIZE_COLUMNS if cfg.find.localize else ())
    write_text_atomic(out / "results.csv", format_csv(rows, columns))
    skipped_rows = [{"path": path, "reason": reason} for path, reason in skipped]
    write_text_atomic(out / "skipped.csv", format_csv(skipped_rows, ("path", "reason")))
    shown = {row["path"] for row in rows[: cfg.find.top_k]}
    shown |= {row["path"] for row in rows if row["pretrained_rank"] <= cfg.find.top_k}
    thumbnails = {path: make_thumbnail(path) for path in shown}
    page = render_find_page(instance, rows, thumbnails, top_k=cfg.find.top_k, gallery=cfg.find.gallery,
                            skipped=len(skipped), located=located)  # fmt: skip
    write_text_atomic(out / "index.html", page)
    write_text_atomic(out / "config.yaml", _yaml(resolved(cfg)))


@ray.remote
def _localize_task(adapter: str, paths: list[str], dense_size: int, min_object_pixels: int) -> list:
    return localize(adapter, paths, dense_size=dense_size, min_object_pixels=min_object_pixels)


def _localize(cfg, adapter: Path, top: list[dict], out: Path) -> dict[str, bytes | None]:
    """Box, confidence and mask of the object in each top hit (one Ray task, on a GPU when the cluster has one):
    adds ``box`` (x0,y0,x1,y1 as fractions of the photo), ``box_score`` and ``mask`` (a PNG under masks/) to the
    rows; returns thumbnails with the mask drawn on, by path."""
    gpus = 1.0 if cluster_has_gpu() else 0.0
    task = _localize_task.options(num_gpus=gpus)
    paths = [row["path"] for row in top]
    shutil.rmtree(out / "masks", ignore_errors=True)  # masks of an earlier run's hits
    found = ray.get(task.remote(str(adapter), paths, cfg.evaluate.dense_image_size, cfg.evaluate.min_object_pixels))
    located = {}
    for row, prediction in zip(top, found, strict=True):
        if prediction is None:
            continue
        height, width = prediction.mask.shape
        x, y, w, h = prediction.box
        row["box"] = ",".join(f"{v:.4f}" for v in (x / width, y / height, (x + w) / width, (y + h) / height))
        row["box_score"] = prediction.score
        row["mask"] = f"masks/hit_{row['rank']:05d}.png"
        write_bytes_atomic(out / row["mask"], encode_mask(prediction.mask))
        located[row["path"]] = make_thumbnail(row["path"], mask=prediction.mask)
    log.info("find %s: the object located in %d of the top %d photos", adapter.name, len(located), len(top))
    return located


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def run(cfg) -> Path:
    """Rank ``find.gallery`` for every selected instance; returns ``OUT/find``."""
    if not cfg.find.gallery:
        raise UserError("find.gallery: pass find.gallery=DIR, the folder of photos to search")
    instances = common.select_instances(cfg, common.load_instances(cfg))
    untrained = [i for i in instances if not (stage_dir(cfg, "train", i) / "adapter_config.json").is_file()]
    if untrained:
        raise MissingInputError(
            f"no personalized encoder for {untrained} under {stage_dir(cfg, 'train')}: run `personalize train` "
            "(or `personalize run`) first, or pick trained instances with data.instances=[...]"
        )
    gallery = Path(cfg.find.gallery).absolute()
    photos, listed_skips = list_gallery(gallery)
    if not photos:
        raise UserError(f"find.gallery={gallery}: no photos found (looked for .jpg, .png, .webp, ... recursively)")
    log.info("find: %d photos in %s (%d other files skipped), %d instance(s)", len(photos), gallery,
             len(listed_skips), len(instances))  # fmt: skip
    with ray_session(cfg):
        for instance in instances:
            find_instance(cfg, instance, photos, listed_skips)
    return stage_dir(cfg, STAGE)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)
