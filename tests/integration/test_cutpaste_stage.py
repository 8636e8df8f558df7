"""`personalize cutpaste` end to end on local Ray, over a tiny ingest output written here."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from personalization import schema
from personalization.artifacts import commit_stage, read_manifest
from personalization.config import build_config
from pipelines import cutpaste

# instance -> (category, split, has masks)
INSTANCES = {
    "mug_a": ("mug", "test", True),
    "mug_b": ("mug", "test", True),
    "mug_v": ("mug", "val", True),
    "shoe_v": ("shoe", "val", True),  # another category's val instance: never composited
    "shoe_x": ("shoe", "test", False),  # no masks
}


def photo(seed):
    rng = np.random.default_rng(seed)
    pixels = np.full((40, 48, 3), 90, np.uint8)
    mask = np.zeros((40, 48), bool)
    mask[8:32, 10:40] = True
    pixels[mask] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels), mask


def write_ingest(out_dir):
    """OUT/ingest as the ingest stage commits it: images.parquet, instances.json, manifest."""

    def build(tmp):
        rows = []
        for n, (instance_id, (category, split, masked)) in enumerate(INSTANCES.items()):
            for i in range(3):
                image, mask = photo(10 * n + i)
                rows.append(
                    schema.make_row(
                        image_id=schema.make_image_id("real", instance_id, i),
                        instance_id=instance_id,
                        category=category,
                        role="real_train" if i < 2 else "real_test",
                        source="real",
                        split="train" if i < 2 else "pose",
                        instance_split=split,
                        image=image,
                        mask=mask if masked else None,
                    )
                )
        (tmp / "instances.json").write_text(
            json.dumps({k: {"category": c, "split": s} for k, (c, s, _) in INSTANCES.items()})
        )
        return schema.write_image_table(rows, tmp / "images.parquet")

    commit_stage(out_dir / "ingest", "ingest", {"test": 1}, build)


def id_to_image(table):
    return dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True))


def config(out_dir, **cutpaste):
    delta = {"images_per_instance": 3, "image_size": 48, **cutpaste}
    return build_config(
        {"output_dir": str(out_dir), "seed": 5, "data": {"instances": ["mug_a", "mug_b"]}, "cutpaste": delta}
    )


def test_cutpaste_stage_end_to_end(ray_local, tmp_path):
    write_ingest(tmp_path / "one")
    cfg = config(tmp_path / "one")
    out = cutpaste.run(cfg)
    assert out == tmp_path / "one" / "cutpaste"
    # One committed unit per instance: mug_a, mug_b and the same-category val instance mug_v, 3 composites each.
    manifests = {i: read_manifest(out / i) for i in ("mug_a", "mug_b", "mug_v")}
    assert {m["stage"] for m in manifests.values()} == {"cutpaste"} and [m["rows"] for m in manifests.values()] == [
        3
    ] * 3
    assert read_manifest(out) is None and not (out / "shoe_v").exists()
    files = schema.parquet_files(out)
    expected_types = [(field.name, field.type) for field in schema.IMAGE_SCHEMA]
    assert files and all([(f.name, f.type) for f in pq.read_schema(path)] == expected_types for path in files)
    table = schema.read_image_table(out)
    rows = table.to_pylist()
    assert sorted({r["instance_id"] for r in rows}) == ["mug_a", "mug_b", "mug_v"]
    assert len({r["image_id"] for r in rows}) == 9
    assert {(r["role"], r["source"], r["split"], r["generator"]) for r in rows} == {
        ("positive", "cutpaste", "", "cutpaste")
    }
    assert {r["instance_id"]: r["instance_split"] for r in rows}["mug_v"] == "val"
    for r in rows:
        image, mask = schema.decode_image(r["image"]), schema.decode_mask(r["mask"])
        assert image.size == (r["width"], r["height"]) == (48, 48) and mask.shape == (48, 48) and mask.any()

    # Skipped on a second run: the manifests are untouched.
    assert cutpaste.run(cfg) == out and {i: read_manifest(out / i) for i in manifests} == manifests

    # A fresh output folder gives the same ids and the same pixels (per-composite seeds, any worker order).
    write_ingest(tmp_path / "two")
    again = schema.read_image_table(cutpaste.run(config(tmp_path / "two")))
    assert id_to_image(again) == id_to_image(table)


def test_backgrounds_folder_and_no_val(ray_local, tmp_path):
    write_ingest(tmp_path)
    backgrounds = tmp_path / "backgrounds"
    backgrounds.mkdir()
    Image.new("RGB", (80, 60), (10, 200, 30)).save(backgrounds / "green.png")
    overrides = [f"output_dir={tmp_path}", "data.instances=[mug_a,mug_b]", "cutpaste.image_size=48"]
    overrides += [
        f"cutpaste.backgrounds_dir={backgrounds}",
        "cutpaste.include_val=false",
        "cutpaste.images_per_instance=2",
    ]
    assert cutpaste.main(overrides) == 0  # the `personalize cutpaste` entry point
    table = schema.read_image_table(tmp_path / "cutpaste")
    assert sorted(table["instance_id"].to_pylist()) == ["mug_a", "mug_a", "mug_b", "mug_b"]
    for row in table.to_pylist():
        pixels, mask = np.asarray(schema.decode_image(row["image"])), schema.decode_mask(row["mask"])
        # Far from the pasted object only the one green background photo shows.
        far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(7)))
        assert np.all(np.abs(pixels[far].astype(int) - (10, 200, 30)) <= 1)


def test_maskless_instance_fails_before_ray_work(tmp_path):
    write_ingest(tmp_path)
    cfg = build_config({"output_dir": str(tmp_path), "data": {"instances": ["shoe_x"]}})
    with pytest.raises(ValueError, match=r"shoe_x.*train_masks"):
        cutpaste.run(cfg)
    assert not (tmp_path / "cutpaste").exists()


def test_missing_ingest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="personalize ingest"):
        cutpaste.run(build_config({"output_dir": str(tmp_path)}))


def test_disabled_stage_commits_an_empty_table(tmp_path):
    write_ingest(tmp_path)
    cfg = build_config({"output_dir": str(tmp_path), "data": {"instances": ["shoe_x"]}, "cutpaste": {"enabled": False},
                        "train": {"positive_sources": ["real"]}})  # fmt: skip
    out = cutpaste.run(cfg)
    assert read_manifest(out / "shoe_x")["rows"] == 0 and schema.read_image_table(out).num_rows == 0


def test_each_instance_commits_alone_so_a_rerun_redoes_only_what_is_missing(ray_local, tmp_path):
    """Adding an instance, or losing one to a crash before its manifest, redoes only that instance."""
    write_ingest(tmp_path)
    out = cutpaste.run(config(tmp_path, include_val=False, images_per_instance=2))
    only_a = build_config(
        {"output_dir": str(tmp_path), "seed": 5, "data": {"instances": ["mug_a"]},
         "cutpaste": {"images_per_instance": 2, "image_size": 48, "include_val": False}}
    )  # fmt: skip
    before = {i: read_manifest(out / i) for i in ("mug_a", "mug_b")}
    (out / "mug_b" / "_manifest.json").unlink()  # mug_b's build was cut short: no manifest, as after a crash
    cutpaste.run(only_a)  # a run of mug_a alone leaves mug_b's remains for the run that selects it
    assert read_manifest(out / "mug_a") == before["mug_a"]
    cutpaste.run(config(tmp_path, include_val=False, images_per_instance=2))
    assert read_manifest(out / "mug_a") == before["mug_a"]  # untouched: not redone
    assert read_manifest(out / "mug_b")["rows"] == 2  # redone and committed
    assert schema.read_image_table(out).num_rows == 4
