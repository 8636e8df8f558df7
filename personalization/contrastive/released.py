"""Released generated positives read from a folder: positive source ``released`` (``train.positives_dir``).

The paper's authors released their generated datasets; to train on such images instead of generating them, put
each object's positives in a subfolder named for its instance id::

    positives_dir/
      mug_01/            one folder per instance id you train (instances.json's keys)
        0000.png         its generated images: PNG, JPEG, WEBP or BMP, any names, read in name order
        0001.jpg
      shoe_03/
        ...

Other entries are ignored. The file bytes are kept as they are (like ``train.negatives_dir``'s), and every row
passes the image-table checks of personalization/schema.py (role ``positive``, source ``released``, an image
Pillow identifies as one of the table formats). A trained instance whose subfolder is missing or holds no image
is an error naming the folder and the instance, raised while train plans its triplets, before any training.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from personalization.errors import MissingInputError, UserError
from personalization.schema import IMAGE_SCHEMA, TABLE_IMAGE_FORMATS, make_image_id, make_row, validate_table

SOURCE = "released"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def released_image_paths(positives_dir: str | Path, instance_id: str) -> list[Path]:
    """The image files of ``positives_dir/<instance_id>/``, sorted; a MissingInputError naming the folder and the
    instance when it is missing or holds none."""
    folder = Path(positives_dir) / instance_id
    if not folder.is_dir():
        raise MissingInputError(
            f"train.positives_dir: {folder} does not exist: instance {instance_id!r} has no released positives; "
            f"add a {instance_id}/ folder of its images to {positives_dir} or drop released from "
            "train.positive_sources"
        )
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise MissingInputError(
            f"train.positives_dir: {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}) for instance "
            f"{instance_id!r}; put its released positives there"
        )
    return paths


def check_released_positives(positives_dir: str | Path, instance_ids: Sequence[str]) -> None:
    """Every instance in ``instance_ids`` has a non-empty subfolder (see :func:`released_image_paths`)."""
    for instance_id in instance_ids:
        released_image_paths(positives_dir, instance_id)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path, formats=TABLE_IMAGE_FORMATS) as image:
            return image.size  # reads the header only
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(
            f"train.positives_dir: {path} is not a {'/'.join(TABLE_IMAGE_FORMATS)} image ({error}); "
            "remove it or convert it"
        ) from error


def load_released_positives(
    positives_dir: str | Path,
    instance_id: str,
    category: str,
    *,
    columns: Sequence[str] | None = None,
    image_ids: Collection[str] | None = None,
) -> pa.Table:
    """``instance_id``'s released positives as image-table rows (role ``positive``, source ``released``).

    ``image_ids``: only the files with these ids (an id is made from the instance and the file name).
    ``columns``: the table's columns (all by default); without ``image`` the files' bytes are not read.
    """
    with_bytes = columns is None or "image" in columns
    rows = []
    for path in released_image_paths(positives_dir, instance_id):
        image_id = make_image_id(SOURCE, instance_id, path.name)
        if image_ids is not None and image_id not in image_ids:
            continue
        size = _image_size(path)
        rows.append(
            make_row(
                image_id=image_id,
                instance_id=instance_id,
                category=category,
                role="positive",
                source=SOURCE,
                image=path.read_bytes() if with_bytes else b"",
                size=size,
            )  # fmt: skip
        )
    table = validate_table(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), where=str(Path(positives_dir, instance_id)))
    return table.select(list(columns)) if columns is not None else table
