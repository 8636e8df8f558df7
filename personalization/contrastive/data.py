"""Which images train an instance, and a torch Dataset that turns triplets of ids into pixels.

Roles for instance X (category C), chosen by :func:`select_training_rows`:

- anchors: X's ``real_train`` rows (its few real photos).
- positives: X's rows from each of ``train.positive_sources``: ``cutpaste`` / ``dreambooth`` /
  ``masked_dreambooth`` = synthetic rows (role ``positive``) of that source; ``real`` = the anchors themselves;
  ``released`` = the images in ``train.positives_dir/<X>/`` (contrastive/released.py).
- negatives, by ``train.negatives``:
  - ``val``: the ``real_train`` photos **and** the cut-and-paste composites of the *val* instances of category C.
    Never other test instances: a real user has no photos of the objects we evaluate against.
  - ``folder``: every image in ``train.negatives_dir/<C>_negatives/`` if that folder exists, else in
    ``train.negatives_dir`` itself (the released PODS negatives use the first layout).
  - ``generated``: rows of role ``negative`` and category C from the generate stage (the pretrained generator).
  - ``stock``: generic real photos shipped with scikit-image (contrastive/negatives.py), for a lone folder.

:func:`read_training_rows` reads only what one instance can use, with the instance / category filters and the
column projection pushed into the Parquet reads (a planning pass reads ids only, the run reads the bytes of the
images its triplets use), so memory follows one instance, never the whole dataset. :func:`read_positives` is the
one place ``filter.threshold`` applies.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from personalization.contrastive.negatives import load_stock_negatives
from personalization.contrastive.released import load_released_positives
from personalization.contrastive.triplets import TripletError
from personalization.errors import MissingInputError, UserError
from personalization.schema import (
    IMAGE_SCHEMA,
    decode_image,
    make_image_id,
    make_row,
    read_image_table,
    rows_to_table,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What choosing rows and sampling triplets needs: no image bytes.
ID_COLUMNS = ("image_id", "instance_id", "category", "role", "source")


@dataclass(frozen=True)
class TrainingRows:
    """The image rows one instance trains on (deduplicated by id) and the id pool of each role.

    ``positive_ids_by_source``: ``positive_ids`` split by ``train.positive_sources`` entry (``real`` = the anchors),
    what ``train.source_weights`` draws from (:func:`~personalization.contrastive.triplets.sample_triplets`).
    """

    table: pa.Table
    anchor_ids: list[str]
    positive_ids: list[str]
    negative_ids: list[str]
    positive_ids_by_source: dict[str, list[str]] = field(default_factory=dict)


def _where(table: pa.Table, **equals: str | Sequence[str]) -> pa.Table:
    mask = None
    for column, value in equals.items():
        values = [value] if isinstance(value, str) else list(value)
        term = pc.is_in(table[column], value_set=pa.array(values, pa.string()))
        mask = term if mask is None else pc.and_(mask, term)
    return table if mask is None else table.filter(mask)


def _ids(table: pa.Table) -> list[str]:
    return sorted(set(table["image_id"].to_pylist()))


def load_negatives_folder(
    negatives_dir: str | Path, category: str, image_ids: Collection[str] | None = None
) -> pa.Table:
    """Image rows (role ``negative``, source ``pretrained``) for every image file in the negatives folder.

    Reads ``<negatives_dir>/<category>_negatives/`` when it exists, else ``negatives_dir`` itself. The file's
    bytes are kept as they are (PNG or JPEG; :func:`~personalization.schema.decode_image` reads both).
    ``image_ids``: only the files with these ids are read (an id is made from the category and the file name).
    """
    root = Path(negatives_dir)
    folder = root / f"{category}_negatives"
    folder = folder if folder.is_dir() else root
    if not folder.is_dir():
        raise MissingInputError(f"train.negatives_dir: {root} is not a folder of negative images")
    rows = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if image_ids is not None and make_image_id("negatives_folder", category, path.name) not in image_ids:
            continue
        with Image.open(path) as image:
            size = image.size  # reads the header only
        rows.append(
            make_row(
                image_id=make_image_id("negatives_folder", category, path.name),
                instance_id=f"{category}_negatives",
                category=category,
                role="negative",
                source="pretrained",
                image=path.read_bytes(),
                size=size,
            )
        )
    return rows_to_table(rows) if rows else IMAGE_SCHEMA.empty_table()


@dataclass(frozen=True)
class TrainingSources:
    """The image tables one instance's rows are read from (files or folders; empty = that stage did not run).

    Each is read filtered to what the instance needs, so a folder may hold other instances' rows too.
    """

    real: Path | str  # the ingest table: real_train photos (anchors; val negatives)
    cutpaste: Sequence[Path | str] = ()  # cut-and-paste composites
    positives: Sequence[Path | str] = ()  # generated positives: rescored by `personalize filter`, or as generated
    negatives: Sequence[Path | str] = ()  # generated negatives of the instance's category
    threshold: float | None = None  # filter.threshold, applied by read_positives
    released: Path | str = ""  # train.positives_dir: <instance_id>/ folders of images (contrastive/released.py)


def read_positives(
    paths: Sequence[Path | str],
    instance_id: str,
    threshold: float | None,
    *,
    columns: Sequence[str] | None = None,
    image_ids: Collection[str] | None = None,
) -> pa.Table:
    """An instance's generated positives as training uses them: the one place ``filter.threshold`` applies.

    The rule: a row whose ``score`` is below ``threshold`` is dropped; a row without a score is kept (it was never
    scored: generated with ``filter.enabled=false`` and not rescored by ``personalize filter``). Every scored row
    stays on disk, so changing the threshold retrains without regenerating (a sweep over it costs nothing).
    ``generate`` also compares scores with the threshold, only to know when an instance has enough accepted
    images to stop sampling. ``threshold=None`` keeps every row.
    """
    only = {"image_id": sorted(image_ids)} if image_ids is not None else {}
    return read_image_table(paths, columns=columns, min_score=threshold, instance_id=instance_id, **only)


def val_negative_instances(instances: Mapping[str, Mapping[str, str]], instance_id: str) -> list[str]:
    """The val instances of ``instance_id``'s category other than itself (``train.negatives=val``)."""
    category = instances[instance_id]["category"]
    return sorted(
        k for k, v in instances.items() if v["split"] == "val" and v["category"] == category and k != instance_id
    )


def read_training_rows(
    sources: TrainingSources,
    instance_id: str,
    train_cfg,
    instances: Mapping[str, Mapping[str, str]],
    *,
    columns: Sequence[str] | None = None,
    image_ids: Collection[str] | None = None,
) -> TrainingRows:
    """:func:`select_training_rows` over only the rows ``instance_id`` can use, read with the filters (instance,
    its category's val instances or negatives, ``image_ids``) and the projection (``columns``, e.g.
    :data:`ID_COLUMNS`) pushed into the Parquet reads: other instances' rows are never loaded.

    ``image_ids``: read only these rows (e.g. the ids a run's triplets use); the table and pools then hold only
    them. ``columns``: the table's columns (all by default).
    """
    if instance_id not in instances:
        raise KeyError(f"instance {instance_id!r} is not in instances.json; known: {sorted(instances)[:10]}")
    sources_used = set(train_cfg.positive_sources)
    val = val_negative_instances(instances, instance_id) if train_cfg.negatives == "val" else []
    only = {"image_id": sorted(image_ids)} if image_ids is not None else {}
    images = read_image_table(sources.real, columns=columns, role="real_train", instance_id=[instance_id, *val], **only)
    composited = ([instance_id] if "cutpaste" in sources_used else []) + val
    parts = [read_image_table(sources.cutpaste, columns=columns, instance_id=composited, **only)] if composited else []
    if sources_used & {"dreambooth", "masked_dreambooth"}:
        parts.append(read_positives(sources.positives, instance_id, sources.threshold, columns=columns,
                                    image_ids=image_ids))  # fmt: skip
    if "released" in sources_used:
        parts.append(load_released_positives(sources.released, instance_id, instances[instance_id]["category"],
                                             columns=columns, image_ids=image_ids))  # fmt: skip
    if train_cfg.negatives == "generated":
        category = instances[instance_id]["category"]
        parts.append(read_image_table(sources.negatives, columns=columns, category=category, role="negative", **only))
    synthetic = pa.concat_tables(parts) if parts else images.schema.empty_table()
    rows = select_training_rows(images, synthetic, instance_id, train_cfg, instances, image_ids=image_ids)
    if not rows.positive_ids and sources_used & {"dreambooth", "masked_dreambooth"}:
        _check_threshold_kept_some(sources, instance_id)
    return rows


def _check_threshold_kept_some(sources: TrainingSources, instance_id: str) -> None:
    """Raise, naming ``filter.threshold``, when the instance has generated positives but the threshold drops every
    one of them (the generic "no synthetic positives" error would point at the wrong keys)."""
    if sources.threshold is None or not sources.positives:
        return
    scores = read_image_table(sources.positives, columns=["score"], instance_id=instance_id)["score"]
    if not len(scores):
        return
    best = pc.max(scores).as_py()
    raise TripletError(
        f"instance {instance_id}: filter.threshold={sources.threshold} rejects all {len(scores)} generated "
        f"positives (their best DreamSim score is {best:.3f}); lower it, e.g. filter.threshold={best:.2f}, and "
        "re-run: the scored images stay on disk, so only train runs again"
    )


def select_training_rows(
    images: pa.Table,
    synthetic: pa.Table,
    instance_id: str,
    train_cfg,
    instances: Mapping[str, Mapping[str, str]],
    *,
    image_ids: Collection[str] | None = None,
) -> TrainingRows:
    """Pick anchors, positives and negatives of ``instance_id`` (see the module docstring for the rules).

    Args:
        images: the ingest image table (real_train / real_test rows of all instances).
        synthetic: cut-and-paste and generated rows (any instances; may be empty).
        train_cfg: the ``train`` config section (``positive_sources``, ``negatives``, ``negatives_dir``).
        instances: ``instances.json``: ``{instance_id: {"category": ..., "split": ...}}``.
        image_ids: keep only these rows (negatives folders are then read only for them).

    The table has the columns of ``images`` (it may be a projection, e.g. :data:`ID_COLUMNS`).
    """
    if instance_id not in instances:
        raise KeyError(f"instance {instance_id!r} is not in instances.json; known: {sorted(instances)[:10]}")
    category = instances[instance_id]["category"]
    anchors = _where(images, instance_id=instance_id, role="real_train")

    positive_parts = {}
    for source in train_cfg.positive_sources:
        if source == "real":
            positive_parts[source] = anchors
        else:
            positive_parts[source] = _where(synthetic, instance_id=instance_id, role="positive", source=source)

    if train_cfg.negatives == "val":
        val_instances = val_negative_instances(instances, instance_id)
        negative_parts = [
            _where(images, instance_id=val_instances, role="real_train"),
            _where(synthetic, instance_id=val_instances, role="positive", source="cutpaste"),
        ]
    elif train_cfg.negatives == "folder":
        negative_parts = [load_negatives_folder(train_cfg.negatives_dir, category, image_ids)]
    elif train_cfg.negatives == "generated":
        negative_parts = [_where(synthetic, category=category, role="negative")]
    elif train_cfg.negatives == "stock":
        negative_parts = [load_stock_negatives(category)]
    else:  # "auto" is resolved before this (pipelines/common.py: resolve_negatives)
        raise UserError(f"train.negatives={train_cfg.negatives!r}: use val, folder, generated or stock")

    schema = images.schema
    anchors, positives, negatives = (
        _concat(parts, schema, image_ids) for parts in ([anchors], list(positive_parts.values()), negative_parts)
    )
    kept = set(positives["image_id"].to_pylist())
    by_source = {source: [i for i in _ids(part) if i in kept] for source, part in positive_parts.items()}
    table = pa.concat_tables([anchors, positives, negatives])
    # One row per id: the "real" positive source repeats the anchors.
    _, first = _unique_first(table["image_id"].to_pylist())
    table = table.take(pa.array(first, pa.int64()))
    return TrainingRows(table, _ids(anchors), _ids(positives), _ids(negatives), by_source)


def _concat(parts: Sequence[pa.Table], schema: pa.Schema, image_ids: Collection[str] | None) -> pa.Table:
    """The parts in ``schema``'s columns and types, restricted to ``image_ids`` when given."""
    table = pa.concat_tables([t.select(schema.names).cast(schema) for t in parts]) if parts else schema.empty_table()
    if image_ids is not None:
        table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(sorted(image_ids), pa.string())))
    return table


def _unique_first(ids: Sequence[str]) -> tuple[list[str], list[int]]:
    seen: dict[str, int] = {}
    for index, image_id in enumerate(ids):
        seen.setdefault(image_id, index)
    return list(seen), sorted(seen.values())


class TripletDataset(torch.utils.data.Dataset):
    """``triplets[k]`` = (anchor_id, positive_id, negative_id) -> ``(a, p, n)`` tensors ``(3, H, W)`` each.

    Each image's bytes are decoded once (on first use) and kept as a PIL image, optionally shrunk so its longer
    side is at most ``max_side`` (generated images are often 512 px while the model eats 224): decoding and
    resizing are the CPU cost of this loader. ``transform`` (PIL -> tensor, e.g. the reference augmentation)
    runs on every access, so each epoch sees fresh augmentations.
    """

    def __init__(
        self,
        table: pa.Table,
        triplets: Sequence[tuple[str, str, str]],
        transform: Callable[[Image.Image], torch.Tensor],
        max_side: int | None = None,
    ):
        self.triplets = [tuple(t) for t in triplets]
        self.transform = transform
        self.max_side = max_side
        needed = {image_id for triplet in self.triplets for image_id in triplet}
        ids = table["image_id"].to_pylist()
        missing = needed - set(ids)
        if missing:
            raise KeyError(f"{len(missing)} triplet image ids are not in the image table, e.g. {min(missing)}")
        keep = [i for i, image_id in enumerate(ids) if image_id in needed]
        # Hold only the bytes of images that are used; the rest of the table is dropped.
        self._bytes = dict(
            zip(
                [ids[i] for i in keep],
                table["image"].take(pa.array(keep, pa.int64())).to_pylist(),
                strict=True,
            )
        )
        self._decoded: dict[str, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.triplets)

    def image(self, image_id: str) -> Image.Image:
        image = self._decoded.get(image_id)
        if image is None:
            image = decode_image(self._bytes[image_id])
            if self.max_side and max(image.size) > self.max_side:
                image.thumbnail((self.max_side, self.max_side), Image.Resampling.BICUBIC)
            self._decoded[image_id] = image
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        anchor, positive, negative = self.triplets[index]
        return (
            self.transform(self.image(anchor)),
            self.transform(self.image(positive)),
            self.transform(self.image(negative)),
        )
