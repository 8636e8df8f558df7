"""Positive source ``released``: per-object positives read from train.positives_dir/<instance_id>/ (real photo crops
here), validated like every image-table row, and drawn into the planned triplets by train's own planner."""

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from personalization.config import ConfigError, build_config
from personalization.contrastive.released import load_released_positives
from personalization.errors import MissingInputError, UserError
from personalization.schema import decode_image, make_image_id, make_row, write_image_table
from pipelines.common import check_before_start
from pipelines.training import instance_rows, plan_triplets, stage_inputs

INSTANCES = {"mug_01": {"category": "mug", "split": "test"}}


def _crops(photo: np.ndarray, n: int, side: int = 48) -> list[Image.Image]:
    return [Image.fromarray(photo[20 * k : 20 * k + side, 30 * k : 30 * k + side]) for k in range(n)]


@pytest.fixture
def world(tmp_path):
    out = tmp_path / "out"
    (out / "ingest").mkdir(parents=True)
    (out / "ingest" / "instances.json").write_text(json.dumps(INSTANCES))
    anchors = [
        make_row(
            image_id=f"real{k}",
            instance_id="mug_01",
            category="mug",
            role="real_train",
            source="real",
            image=crop,
            split="train",
            instance_split="test",
        )  # fmt: skip
        for k, crop in enumerate(_crops(skimage.data.chelsea(), 3))
    ]
    write_image_table(anchors, out / "ingest" / "images.parquet")
    released = tmp_path / "released" / "mug_01"
    released.mkdir(parents=True)
    names = []
    for k, crop in enumerate(_crops(skimage.data.coffee(), 4)):
        names.append(f"{k:04d}.{'png' if k % 2 else 'jpg'}")
        crop.save(released / names[-1])
    (released / "notes.txt").write_text("not an image: skipped")
    negatives = tmp_path / "negatives"
    negatives.mkdir()
    for k, crop in enumerate(_crops(skimage.data.astronaut(), 5)):
        crop.save(negatives / f"n{k}.png")
    return tmp_path, out, released, names


def _config(tmp_path, out, **extra):
    train = {
        "positive_sources": ["real", "released"],
        "positives_dir": str(tmp_path / "released"),
        "negatives": "folder",
        "negatives_dir": str(tmp_path / "negatives"),
        "num_triplets": 400,
    } | extra
    return build_config({"output_dir": str(out), "train": train})  # fmt: skip


def test_released_positives_are_planned_into_triplets(world):
    tmp_path, out, released, names = world
    cfg = _config(tmp_path, out, source_weights={"real": 1, "released": 3})
    inputs = stage_inputs(cfg)
    assert inputs["released"] == released.parent
    triplets = plan_triplets(cfg, "mug_01", INSTANCES, inputs)
    released_ids = {make_image_id("released", "mug_01", name) for name in names}
    positives = [p for _, p, _ in triplets]
    assert set(positives) & released_ids == released_ids  # every released image is drawn
    assert sum(p in released_ids for p in positives) == 300  # its 3/4 share of 400
    # the run's rows: the released files' own pixels, source "released", role "positive"
    rows = instance_rows(cfg, "mug_01", INSTANCES, inputs, image_ids={i for t in triplets for i in t}).table
    by_id = {r["image_id"]: r for r in rows.to_pylist()}
    for name in names:
        row = by_id[make_image_id("released", "mug_01", name)]
        assert (row["role"], row["source"], row["category"], row["width"]) == ("positive", "released", "mug", 48)
        expected = np.asarray(Image.open(released / name).convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(row["image"])), expected)


def test_planning_reads_no_image_bytes(world):
    tmp_path, _, released, names = world
    table = load_released_positives(released.parent, "mug_01", "mug", columns=("image_id", "source"))
    assert table.column_names == ["image_id", "source"]
    assert table.num_rows == len(names)


def test_missing_or_empty_instance_folder_fails_before_training(world):
    tmp_path, out, released, _ = world
    cfg = _config(tmp_path, out)
    instances = INSTANCES | {"shoe_02": {"category": "shoe", "split": "test"}}
    with pytest.raises(MissingInputError, match=r"released/shoe_02 does not exist.*'shoe_02'"):
        plan_triplets(cfg, "shoe_02", instances, stage_inputs(cfg))
    (released.parent / "shoe_02").mkdir()
    with pytest.raises(MissingInputError, match=r"released/shoe_02 holds no image .*'shoe_02'"):
        plan_triplets(cfg, "shoe_02", instances, stage_inputs(cfg))


def test_a_file_that_is_not_an_image_is_named(world):
    tmp_path, _, released, _ = world
    (released / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"broken\.png is not a PNG/JPEG/WEBP/BMP image"):
        load_released_positives(released.parent, "mug_01", "mug")


def test_config_ties_released_to_positives_dir(world):
    tmp_path, out, _, _ = world
    with pytest.raises(ConfigError, match=r"train\.positives_dir: positive source released needs"):
        build_config({"train": {"positive_sources": ["released"]}})
    with pytest.raises(ConfigError, match=r"train\.positives_dir: .* add released to train\.positive_sources"):
        build_config({"train": {"positive_sources": ["real"], "positives_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"train\.positives_dir: .*nowhere is not a folder"):
        build_config({"train": {"positive_sources": ["released"], "positives_dir": str(tmp_path / "nowhere")}})
    assert _config(tmp_path, out, source_weights={"real": 0, "released": 1}).train.source_weights["released"] == 1


def test_run_stops_before_any_work_without_the_instance_folder(tmp_path):
    photos = tmp_path / "my_mug"
    photos.mkdir()
    Image.fromarray(skimage.data.coffee()[:64, :64]).save(photos / "a.png")
    (tmp_path / "released").mkdir()
    overrides = {"data": {"root": str(photos), "category": "mug"},
                 "train": {"positive_sources": ["released"], "positives_dir": str(tmp_path / "released"),
                           "stock_negatives": True}}  # fmt: skip
    cfg = build_config({"output_dir": str(tmp_path / "out")}, overrides)
    with pytest.raises(MissingInputError, match=r"released/my_mug does not exist: instance 'my_mug'"):
        check_before_start(cfg)
    assert not (tmp_path / "out").exists()
