import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from personalization.schema import (
    IMAGE_SCHEMA,
    SchemaError,
    decode_image,
    decode_mask,
    make_image_id,
    make_row,
    read_image_table,
    write_image_table,
)


def _row(i, role="real_train", score=None, instance="mug_1"):
    image = Image.fromarray(np.full((8, 6, 3), i, dtype=np.uint8))
    mask = np.zeros((8, 6), bool)
    mask[2:5, 1:4] = True
    return make_row(
        image_id=make_image_id("real", i),
        instance_id=instance,
        category="mug",
        role=role,
        source="real",
        image=image,
        mask=mask,
        split="train",
        instance_split="test",
        score=score,
    )


def test_round_trip_png_and_mask(tmp_path):
    rows = [_row(i) for i in range(3)]
    assert write_image_table(rows, tmp_path / "t.parquet") == 3
    table = read_image_table(tmp_path)
    assert table.schema.equals(IMAGE_SCHEMA, check_metadata=False) and table.num_rows == 3
    first = table.to_pylist()[0]
    assert (first["width"], first["height"]) == (6, 8)
    assert np.asarray(decode_image(first["image"]))[0, 0].tolist() == [0, 0, 0]
    assert decode_mask(first["mask"]).sum() == 9
    assert pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0).column(0).compression == "ZSTD"


def test_ids_are_stable_and_distinct():
    assert make_image_id("real", "a.jpg") == make_image_id("real", "a.jpg")
    assert make_image_id("real", "a.jpg") != make_image_id("real", "b.jpg")
    assert len(make_image_id("x")) == 16


def test_filters_and_score_threshold(tmp_path):
    rows = [_row(0), _row(1, role="positive", score=0.7), _row(2, role="positive", score=0.5, instance="mug_2")]
    write_image_table(rows, tmp_path / "a.parquet")
    assert read_image_table(tmp_path, role="positive").num_rows == 2
    assert read_image_table(tmp_path, role="positive", min_score=0.6).num_rows == 1
    assert read_image_table(tmp_path, min_score=0.6).num_rows == 2  # unscored rows are kept
    assert read_image_table(tmp_path, instance_id=["mug_2"]).column("image_id").to_pylist() == [rows[2]["image_id"]]
    assert read_image_table(tmp_path / "empty", columns=["image_id"]).num_rows == 0


def test_bad_rows_and_tables_are_rejected(tmp_path):
    with pytest.raises(SchemaError, match="role="):
        make_row(image_id="x", instance_id="i", category="c", role="anchor", source="real", image=b"", size=(1, 1))
    with pytest.raises(SchemaError, match="mask of x"):
        make_row(
            image_id="x",
            instance_id="i",
            category="c",
            role="real_train",
            source="real",
            image=Image.new("RGB", (4, 4)),
            mask=np.ones((3, 4), bool),
        )
    pq.write_table(pa.table({"image_id": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match="lacks columns"):
        read_image_table(tmp_path / "bad.parquet")
    newer = pa.Table.from_pylist([_row(0)], schema=IMAGE_SCHEMA).replace_schema_metadata(
        {b"personalization.schema_version": b"99"}
    )
    pq.write_table(newer, tmp_path / "newer.parquet")
    with pytest.raises(SchemaError, match="schema version 99"):
        read_image_table(tmp_path / "newer.parquet")
