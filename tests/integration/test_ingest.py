"""`pipelines.ingest` end to end: real Parquet + manifest, caching by manifest, redo after a crash, bad data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personalization.artifacts import MANIFEST, read_manifest
from personalization.config import build_config
from personalization.datasets import DatasetError, make_toy
from personalization.schema import read_image_table
from pipelines import ingest

TOY = dict(
    categories=("mug", "tote"), val_per_category=1, test_per_category=2, test_per_split=2, dense_per_instance=1, size=48
)


@pytest.fixture
def toy(tmp_path) -> Path:
    return make_toy(tmp_path / "toy", seed=0, **TOY)


def _cfg(root: Path, out: Path, **data):
    return build_config({"output_dir": str(out), "data": {"root": str(root), **data}})


def test_ingest_writes_table_and_instances(toy, tmp_path):
    out = ingest.run(_cfg(toy, tmp_path / "out"))
    assert out == tmp_path / "out" / "ingest"
    table = read_image_table(out)
    assert table.num_rows == 6 * (3 + 4 * 2 + 1) == read_manifest(out)["rows"]
    instances = json.loads((out / "instances.json").read_text())
    info = json.loads((toy / "pods_info.json").read_text())
    assert instances == {
        c: {"category": info["class_to_sc"][c], "split": info["class_to_split"][c]} for c in info["classes"]
    }
    rows = table.to_pylist()
    assert Counter(r["role"] for r in rows) == {"real_train": 18, "real_test": 54}
    assert all(r["mask"] is not None and r["source"] == "real" for r in rows)
    assert (out / "config.yaml").is_file()
    # Filtering on read works on what ingest wrote.
    assert read_image_table(out, role="real_train", instance_id="mug_01").num_rows == 3


def test_second_run_is_skipped_and_crash_leftovers_are_redone(toy, tmp_path):
    cfg = _cfg(toy, tmp_path / "out")
    out = ingest.run(cfg)
    manifest = (out / MANIFEST).read_bytes()
    stamp = (out / "images.parquet").stat().st_mtime_ns
    ingest.run(cfg)
    assert (out / MANIFEST).read_bytes() == manifest
    assert (out / "images.parquet").stat().st_mtime_ns == stamp
    # Selection settings do not touch ingest.
    ingest.run(_cfg(toy, tmp_path / "out", instances=["mug_01"], max_instances=1))
    assert (out / MANIFEST).read_bytes() == manifest
    # A folder without a manifest is what a crash leaves: it is redone.
    (out / MANIFEST).unlink()
    (out / "images.parquet").write_bytes(b"half-written")
    ingest.run(cfg)
    assert read_manifest(out) is not None and read_image_table(out).num_rows == 72


def test_changed_data_or_sampling_is_redone(toy, tmp_path):
    cfg = _cfg(toy, tmp_path / "out")
    out = ingest.run(cfg)
    first = read_manifest(out)["hash"]
    Image.fromarray(np.full((48, 48, 3), 90, dtype=np.uint8)).save(toy / "train/mug_01/extra.jpg")
    ingest.run(cfg)
    assert read_manifest(out)["hash"] != first and read_image_table(out).num_rows == 73
    ingest.run(_cfg(toy, tmp_path / "out", max_test_images=1))
    table = read_image_table(out, role="real_test").to_pylist()
    assert set(Counter((r["instance_id"], r["split"]) for r in table).values()) == {1}


def test_bad_dataset_fails_before_writing(toy, tmp_path):
    (toy / "train/mug_01/000.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(toy / "test_masks/tote_02/pose_000.png")
    with pytest.raises(DatasetError) as error:
        ingest.run(_cfg(toy, tmp_path / "out"))
    assert "2 problem(s)" in str(error.value) and "zero-byte" in str(error.value)
    assert "pose_000.png: mask has no object" in str(error.value)
    assert not (tmp_path / "out" / "ingest").exists()
    assert not list((tmp_path / "out").glob(".ingest.tmp-*"))


def test_folder_layout_through_main(tmp_path, capsys):
    photos = tmp_path / "blue_mug"
    photos.mkdir()
    for k in range(3):
        Image.fromarray(np.full((32, 40, 3), 40 * k, dtype=np.uint8)).save(photos / f"p{k}.jpg")
    out_dir = tmp_path / "out"
    with pytest.raises(DatasetError, match="data.category=NAME"):
        ingest.run(_cfg(photos, out_dir))
    assert ingest.main([f"data.root={photos}", "data.category=mug", f"output_dir={out_dir}"]) == 0
    assert "ingest: wrote" in capsys.readouterr().out
    instances = json.loads((out_dir / "ingest" / "instances.json").read_text())
    assert instances == {"blue_mug": {"category": "mug", "split": "user"}}
    assert read_image_table(out_dir / "ingest", role="real_train").num_rows == 3


def test_large_photos_are_downscaled_with_their_masks(tmp_path):
    root = tmp_path / "my_mug"
    (root / "masks").mkdir(parents=True)
    Image.new("RGB", (300, 150), "blue").save(root / "a.png")
    mask = np.zeros((150, 300), np.uint8)
    mask[30:120, 60:240] = 255
    Image.fromarray(mask).save(root / "masks" / "a.png")
    out = ingest.run(_cfg(root, tmp_path / "out", category="mug", max_side=100))
    (row,) = read_image_table(out).to_pylist()
    assert (row["width"], row["height"]) == (100, 50)
    from personalization.schema import decode_mask

    small = decode_mask(row["mask"])
    assert small.shape == (50, 100) and small[10:40, 20:80].all() and not small[:9].any()
