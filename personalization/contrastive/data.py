"""Which images train an instance, and a torch Dataset that turns triplets of ids into pixels.

Roles for instance X (category C), chosen by :func:`select_training_rows`:

- anchors: X's ``real_train`` rows (its few real photos).
- positives: X's rows from each of ``train.positive_sources``: ``cutpaste`` / ``dreambooth`` /
  ``masked_dreambooth`` = synthetic rows (role ``positive``) of that source; ``real`` = the anchors themselves.
- negatives, by ``train.negatives``:
  - ``val``: the ``real_train`` photos **and** the cut-and-paste composites of the *val* instances of category C.
    Never other test instances: a real user has no photos of the objects we evaluate against.
  - ``folder``: every image in ``train.negatives_dir/<C>_negatives/`` if that folder exists, else in
    ``train.negatives_dir`` itself (the released PODS negatives use the first layout).
  - ``generated``: rows of role ``negative`` and category C from the generate stage (the pretrained generator).
  - ``stock``: generic real photos shipped with scikit-image (contrastive/negatives.py), for a lone folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from personalization.contrastive.negatives import load_stock_negatives
from personalization.errors import MissingInputError, UserError
from personalization.schema import IMAGE_SCHEMA, decode_image, make_image_id, make_row, rows_to_table

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class TrainingRows:
    """The image rows one instance trains on (deduplicated by id) and the id pool of each role."""

    table: pa.Table
    anchor_ids: list[str]
    positive_ids: list[str]
    negative_ids: list[str]


def _where(table: pa.Table, **equals: str | Sequence[str]) -> pa.Table:
    mask = None
    for column, value in equals.items():
        values = [value] if isinstance(value, str) else list(value)
        term = pc.is_in(table[column], value_set=pa.array(values, pa.string()))
        mask = term if mask is None else pc.and_(mask, term)
    return table if mask is None else table.filter(mask)


def _ids(table: pa.Table) -> list[str]:
    return sorted(set(table["image_id"].to_pylist()))


def load_negatives_folder(negatives_dir: str | Path, category: str) -> pa.Table:
    """Image rows (role ``negative``, source ``pretrained``) for every image file in the negatives folder.

    Reads ``<negatives_dir>/<category>_negatives/`` when it exists, else ``negatives_dir`` itself. The file's
    bytes are kept as they are (PNG or JPEG; :func:`~personalization.schema.decode_image` reads both).
    """
    root = Path(negatives_dir)
    folder = root / f"{category}_negatives"
    folder = folder if folder.is_dir() else root
    if not folder.is_dir():
        raise MissingInputError(f"train.negatives_dir: {root} is not a folder of negative images")
    rows = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
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


def select_training_rows(
    images: pa.Table,
    synthetic: pa.Table,
    instance_id: str,
    train_cfg,
    instances: Mapping[str, Mapping[str, str]],
) -> TrainingRows:
    """Pick anchors, positives and negatives of ``instance_id`` (see the module docstring for the rules).

    Args:
        images: the ingest image table (real_train / real_test rows of all instances).
        synthetic: cut-and-paste and generated rows (any instances; may be empty).
        train_cfg: the ``train`` config section (``positive_sources``, ``negatives``, ``negatives_dir``).
        instances: ``instances.json``: ``{instance_id: {"category": ..., "split": ...}}``.
    """
    if instance_id not in instances:
        raise KeyError(f"instance {instance_id!r} is not in instances.json; known: {sorted(instances)[:10]}")
    category = instances[instance_id]["category"]
    anchors = _where(images, instance_id=instance_id, role="real_train")

    positive_parts = []
    for source in train_cfg.positive_sources:
        if source == "real":
            positive_parts.append(anchors)
        else:
            positive_parts.append(_where(synthetic, instance_id=instance_id, role="positive", source=source))

    if train_cfg.negatives == "val":
        val_instances = sorted(k for k, v in instances.items() if v["split"] == "val" and v["category"] == category)
        val_instances = [k for k in val_instances if k != instance_id]
        negative_parts = [
            _where(images, instance_id=val_instances, role="real_train"),
            _where(synthetic, instance_id=val_instances, role="positive", source="cutpaste"),
        ]
    elif train_cfg.negatives == "folder":
        negative_parts = [load_negatives_folder(train_cfg.negatives_dir, category)]
    elif train_cfg.negatives == "generated":
        negative_parts = [_where(synthetic, category=category, role="negative")]
    elif train_cfg.negatives == "stock":
        negative_parts = [load_stock_negatives(category)]
    else:  # "auto" is resolved before this (pipelines/train.py: resolve_negatives)
        raise UserError(f"train.negatives={train_cfg.negatives!r}: use val, folder, generated or stock")

    schema = images.schema
    positives = pa.concat_tables([t.cast(schema) for t in positive_parts]) if positive_parts else schema.empty_table()
    negatives = pa.concat_tables([t.cast(schema) for t in negative_parts])
    table = pa.concat_tables([anchors, positives.cast(schema), negatives.cast(schema)])
    # One row per id: the "real" positive source repeats the anchors.
    _, first = _unique_first(table["image_id"].to_pylist())
    table = table.take(pa.array(first, pa.int64()))
    return TrainingRows(table, _ids(anchors), _ids(positives), _ids(negatives))


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
