"""The evaluation image sets, read from the ingest image table a batch at a time (never the whole table at once).

The evaluated population is every non-val instance. Its ``real_train`` images are the retrieval gallery and the
classification references (``train``); its ``real_test`` images are the test set (``test``: the other instances'
are the negatives). Dense evaluation (detection, segmentation) uses the ``test_dense`` split when present, else
the test images with masks (``dense``); when every test image is ``test_dense``, they serve every task. Each test
image keeps its PODS test split (``split``: ``in_distribution``, ``pose``, ``distractors``,
``pose_and_distractors``), which the per-split metrics cut the test set by.

:func:`load_evaluation_images` reads ids, sizes and mask presence without the pixels (``EvaluationImages``, about
100 bytes per image: what the driver holds and ships to the actors); :func:`iter_rows` streams the pixels of
chosen ids, in ingest order, ``batch_size`` rows at a time (what an actor holds).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from personalization import schema
from personalization.datasets.layouts import TEST_SPLITS
from personalization.errors import MissingInputError

INSTANCES_FILE = "instances.json"  # beside an ingest image table: {instance_id: {"category", "split"}}
INDEX_COLUMNS = ("image_id", "instance_id", "role", "split", "height", "width")
SCAN_ROWS = 64  # rows decoded per Parquet read while streaming (bounds memory with multi-megabyte PNGs)


@dataclass(frozen=True)
class EvaluationImages:
    """Image ids per use, each list in ingest order, with what the metrics need to know about each image.

    ``owner``: image_id -> instance_id; ``size``: image_id -> (height, width); ``masked``: ids with a mask;
    ``split``: test image_id -> its test split, for the test images whose split is one of ``TEST_SPLITS``.
    """

    train: list[str]
    test: list[str]
    dense: list[str]
    owner: dict[str, str] = field(repr=False)
    size: dict[str, tuple[int, int]] = field(repr=False)
    masked: frozenset[str] = field(repr=False)
    split: dict[str, str] = field(default_factory=dict, repr=False)

    def test_splits(self) -> list[str]:
        """The test splits the test set holds, in ``TEST_SPLITS`` order (empty without PODS-style splits)."""
        present = {self.split[i] for i in self.test if i in self.split}
        return [name for name in TEST_SPLITS if name in present]

    def instances_with_test_images(self) -> set[str]:
        return {self.owner[i] for i in self.test}

    def masked_train(self, instance: str) -> list[str]:
        """The instance's masked train images, in ingest order (the first is its dense reference)."""
        return [i for i in self.train if self.owner[i] == instance and i in self.masked]


def load_instances_file(folder: str | Path) -> dict[str, dict]:
    """``folder/instances.json`` (an ingest folder, or a view of one such as a sweep's probe view)."""
    path = Path(folder) / INSTANCES_FILE
    if not path.is_file():
        raise MissingInputError(f"{path} is missing: run `personalize ingest` (or `personalize run`) first")
    return json.loads(path.read_text())


def load_evaluation_images(images_path: str | Path, instances: Mapping[str, Mapping]) -> EvaluationImages:
    """The sets of ``images_path`` (an ingest image table) for ``instances`` (instances.json: id -> {"split"})."""
    population = {i for i, info in instances.items() if info["split"] != "val"}
    rows: dict[str, list] = {name: [] for name in (*INDEX_COLUMNS, "has_mask")}
    for batch in schema.iter_image_batches(images_path, columns=[*INDEX_COLUMNS, "mask"], batch_size=SCAN_ROWS):
        keep = pc.and_(
            pc.is_in(batch["role"], pa.array(["real_train", "real_test"])),
            pc.is_in(batch["instance_id"], pa.array(sorted(population), pa.string())),
        )
        batch = batch.filter(keep)
        for name in INDEX_COLUMNS:
            rows[name] += batch[name].to_pylist()
        rows["has_mask"] += pc.is_valid(batch["mask"]).to_pylist()
    index = list(zip(*(rows[name] for name in (*INDEX_COLUMNS, "has_mask")), strict=True))
    train = [r[0] for r in index if r[2] == "real_train"]
    test_all = [r for r in index if r[2] == "real_test"]
    test = [r[0] for r in test_all if r[3] != "test_dense"] or [r[0] for r in test_all]
    dense = [r[0] for r in test_all if r[3] == "test_dense"] or [r[0] for r in test_all if r[6]]
    return EvaluationImages(
        train=train,
        test=test,
        dense=dense,
        owner={r[0]: r[1] for r in index},
        size={r[0]: (int(r[4]), int(r[5])) for r in index},
        masked=frozenset(r[0] for r in index if r[6]),
        split={r[0]: r[3] for r in test_all if r[3] in TEST_SPLITS},
    )


def iter_rows(
    images_path: str | Path, image_ids: Iterable[str], columns: Sequence[str], batch_size: int
) -> Iterator[pa.Table]:
    """The rows of ``image_ids`` (columns ``image_id`` + ``columns``), in ingest order, ``batch_size`` at a time.

    One streamed pass over the shards: memory holds one Parquet read (``SCAN_ROWS`` rows) and one output batch.
    """
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    pending: list[pa.Table] = []
    count = 0
    names = ["image_id", *(c for c in columns if c != "image_id")]
    for batch in schema.iter_image_batches(images_path, columns=names, batch_size=SCAN_ROWS):
        kept = pa.Table.from_batches([batch]).filter(pc.is_in(batch["image_id"], wanted))
        if kept.num_rows:
            pending.append(kept)
            count += kept.num_rows
        while count >= batch_size:
            table = pa.concat_tables(pending)
            yield table.slice(0, batch_size)
            pending, count = [table.slice(batch_size)], table.num_rows - batch_size
    if count:
        yield pa.concat_tables(pending)
