"""The image table: the one Parquet contract between stages.

Every stage that makes or reads images speaks this table: one row per image, PNG bytes inline, zstd-compressed
Parquet. ``image_id`` is a stable hash of what made the row, so reruns are idempotent and rows dedupe by id.
The schema version is stored in the Parquet metadata and checked on read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from personalization.errors import UserError

SCHEMA_VERSION = 1
_VERSION_KEY = b"personalization.schema_version"

ROLES = ("real_train", "real_test", "positive", "negative", "background")
SOURCES = ("real", "dreambooth", "masked_dreambooth", "cutpaste", "pretrained", "released")

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("instance_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        # The image's own split: "train", a test split ("in_distribution", "pose", "distractors",
        # "pose_and_distractors", "test_dense"), or "" for synthetic rows.
        pa.field("split", pa.string(), nullable=False),
        # The instance's split in the dataset: "val" (tuning, negatives), "test" (evaluated) or "user".
        pa.field("instance_split", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("cfg", pa.float32()),
        pa.field("generator", pa.string()),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("score", pa.float32()),
    ],
    metadata={_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
COLUMNS = tuple(IMAGE_SCHEMA.names)


class SchemaError(UserError):
    """A table or row that does not follow the image-table contract."""


def make_image_id(*parts: object) -> str:
    """A stable 16-hex-digit id from what made the row (e.g. ``("real", "train/mug_1/a.jpg")``)."""
    blob = json.dumps([str(p) for p in parts], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# What image cells may hold: PNG (every stage writes it) and, for train.negatives_dir and positives_dir rows, a
# user's JPEG/WEBP/BMP bytes kept as they were. Decoding is restricted to these, so no other Pillow decoder runs on
# table bytes.
TABLE_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


def _open_bytes(data: bytes, formats: tuple[str, ...], what: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except Image.UnidentifiedImageError as error:
        raise SchemaError(
            f"{what} bytes are not {'/'.join(formats)} ({data[:8]!r}...); the image table holds PNG, so re-run the "
            "stage that wrote this table"
        ) from error


def decode_image(data: bytes) -> Image.Image:
    """Image-cell bytes (PNG; JPEG/WEBP/BMP from a negatives folder) -> RGB PIL image."""
    with _open_bytes(data, TABLE_IMAGE_FORMATS, "image") as image:
        return image.convert("RGB")


def encode_mask(mask: np.ndarray) -> bytes:
    """Boolean (H, W) mask -> 8-bit PNG (0 / 255)."""
    return encode_png((np.asarray(mask) > 0).astype(np.uint8) * 255)


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes (as :func:`encode_mask` writes them) -> boolean (H, W) mask."""
    with _open_bytes(data, ("PNG",), "mask") as image:
        return np.asarray(image.convert("L")) > 127


def make_row(
    *,
    image_id: str,
    instance_id: str,
    category: str,
    role: str,
    source: str,
    image: Image.Image | bytes,
    split: str = "",
    instance_split: str = "",
    mask: np.ndarray | bytes | None = None,
    prompt: str | None = None,
    seed: int | None = None,
    cfg: float | None = None,
    generator: str | None = None,
    score: float | None = None,
    size: tuple[int, int] | None = None,
) -> dict:
    """One image-table row. ``image`` is a PIL image or PNG bytes (then ``size`` = (width, height))."""
    if role not in ROLES:
        raise SchemaError(f"role={role!r} is not one of {ROLES}")
    if source not in SOURCES:
        raise SchemaError(f"source={source!r} is not one of {SOURCES}")
    if isinstance(image, Image.Image):
        width, height = image.size
        image = encode_png(image)
    elif size is None:
        width, height = decode_image(image).size
    else:
        width, height = size
    if mask is not None and not isinstance(mask, bytes):
        if tuple(np.asarray(mask).shape[:2]) != (height, width):
            raise SchemaError(f"mask of {image_id} is {np.asarray(mask).shape[:2]}, image is {(height, width)}")
        mask = encode_mask(mask)
    return {
        "image_id": image_id,
        "instance_id": instance_id,
        "category": category,
        "role": role,
        "source": source,
        "split": split,
        "instance_split": instance_split,
        "prompt": prompt,
        "seed": seed,
        "cfg": cfg,
        "generator": generator,
        "image": image,
        "mask": mask,
        "width": int(width),
        "height": int(height),
        "score": score,
    }


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=IMAGE_SCHEMA)


def batch_to_table(batch: dict) -> pa.Table:
    """A batch of numpy columns (Ray Data's ``batch_format="numpy"``) -> an image table (schema-typed).

    Ray hands all-null columns back as float NaN; those become nulls again here.
    """
    n = len(batch["image_id"])
    rows = []
    for i in range(n):
        row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        row["mask"] = row["mask"] if isinstance(row.get("mask"), bytes) else None
        score = row.get("score")
        row["score"] = None if score is None or (isinstance(score, float) and math.isnan(score)) else score
        rows.append(row)
    return rows_to_table(rows)


# Rows per Parquet row group in every image table: a streaming reader holds one group of a column at a time
# (64 dense 896 px PNGs are about 64 MB), so this bounds the memory of whoever reads images in batches.
ROW_GROUP_ROWS = 64


def write_image_table(rows: Sequence[dict] | pa.Table, path: str | Path) -> int:
    """Write rows (or a table) as one zstd Parquet file of ``ROW_GROUP_ROWS``-row groups; returns the row count."""
    table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
    table = validate_table(table, where=str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return table.num_rows


def validate_table(table: pa.Table, where: str = "table") -> pa.Table:
    """Check a table against the schema (names, types, version) and return it with the schema's metadata."""
    version = (table.schema.metadata or {}).get(_VERSION_KEY)
    if version is not None and int(version) != SCHEMA_VERSION:
        raise SchemaError(
            f"{where}: image table schema version {int(version)}, this code reads {SCHEMA_VERSION}; "
            "re-run the stage that wrote it"
        )
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise SchemaError(f"{where}: image table lacks columns {missing}")
    table = table.select(list(COLUMNS))
    try:
        return table.cast(IMAGE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as error:
        raise SchemaError(f"{where}: columns do not match the image-table types: {error}") from error


def parquet_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.parts[len(path.parts) :])
    )


def iter_image_batches(path: str | Path, *, columns: Sequence[str], batch_size: int = 32) -> Iterator[pa.RecordBatch]:
    """Stream the shards under ``path`` a batch at a time, each shard's schema validated before it is read.

    For readers that need a few rows out of folders that can hold gigabytes of PNGs (report samples).
    """
    for file in parquet_files(path):
        shard = pq.ParquetFile(file)
        validate_table(shard.schema_arrow.empty_table(), where=str(file))
        yield from shard.iter_batches(batch_size=batch_size, columns=list(columns))


def read_image_table(
    path: str | Path | Iterable[str | Path],
    *,
    columns: Sequence[str] | None = None,
    min_score: float | None = None,
    **equals: str | Sequence[str],
) -> pa.Table:
    """Read every Parquet shard under ``path`` (a file, a folder, or several), validated against the schema.

    ``equals`` filters by column value (``role="real_train"``, ``instance_id=["a", "b"]``); ``min_score`` keeps
    rows whose filter score is at least that value (rows with no score are kept: they were never filtered).
    Projection and filters are pushed into the Parquet reader: only the ``columns`` asked for are decoded, and
    only the row groups that can match are read, so counting ids never loads the image bytes.
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    files = [f for p in paths for f in parquet_files(p)]
    wanted = list(COLUMNS) if columns is None else list(columns)
    schema = pa.schema([IMAGE_SCHEMA.field(name) for name in wanted], metadata=IMAGE_SCHEMA.metadata)
    if not files:
        return schema.empty_table()
    expression = None
    for column, value in equals.items():
        values = [value] if isinstance(value, str) else list(value)
        term = pads.field(column).isin(values)
        expression = term if expression is None else expression & term
    if min_score is not None:
        term = pads.field("score").is_null() | (pads.field("score") >= min_score)
        expression = term if expression is None else expression & term
    tables = []
    for file in files:
        validate_table(pq.read_schema(file).empty_table(), where=str(file))  # names, types, version: metadata only
        table = pq.read_table(file, columns=wanted, filters=expression)
        try:
            tables.append(table.cast(schema))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as error:
            raise SchemaError(f"{file}: columns do not match the image-table types: {error}") from error
    return pa.concat_tables(tables)
