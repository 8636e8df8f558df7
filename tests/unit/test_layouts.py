"""Dataset readers on tiny datasets written here: PODS, Dogs, DF2 and plain-folder layouts, and every bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personalization.datasets import DatasetError, dataset_listing, detect_layout, read_dataset, scan_dataset
from personalization.schema import decode_image, decode_mask, make_image_id

W, H = 24, 16
INSTANCES = {"mug_a": ("mug", "val"), "mug_b": ("mug", "test"), "tote_a": ("tote", "test")}
SPLITS = ("in_distribution", "pose", "distractors", "pose_and_distractors")


def photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def box_mask(key: int) -> np.ndarray:
    """A mask whose box position is unique to ``key``, so a wrong pairing shows."""
    mask = np.zeros((H, W), dtype=bool)
    row, col = key % 4 * 4, key // 4 % 6 * 4
    mask[row : row + 3, col : col + 3] = True
    return mask


def save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def write_dataset(
    root: Path,
    layout: str = "pods",
    *,
    train: int = 3,
    per_split: int = 2,
    annos: str = "relpath",
    instances: dict = INSTANCES,
) -> dict[str, dict]:
    """Writes a tiny dataset; returns relpath -> expected row fields (and the mask it must get)."""
    expected: dict[str, dict] = {}
    key = 0
    annos_json: dict[str, dict] = {}
    for instance, (category, split) in instances.items():
        for k in range(train):
            rel = f"train/{instance}/{k:02d}.jpg"
            photo(root / rel, key)
            save_mask(root / f"train_masks/{instance}/{k:02d}.png", box_mask(key))
            expected[rel] = dict(
                instance_id=instance,
                category=category,
                role="real_train",
                split="train",
                instance_split=split,
                mask=box_mask(key),
            )
            key += 1
        for test_split in SPLITS:
            for k in range(per_split):
                stem = f"{instance}_{test_split}_{k}"
                rel = f"test/{instance}/{stem}.png"
                photo(root / rel, key)
                save_mask(root / f"test_masks/{instance}/{stem}.png", box_mask(key))
                annos_json[rel if annos == "relpath" else stem] = {
                    "class": instance,
                    "split": "test",
                    "test_split": test_split,
                }
                expected[rel] = dict(
                    instance_id=instance,
                    category=category,
                    role="real_test",
                    split=test_split if annos else "in_distribution",
                    instance_split=split,
                    mask=box_mask(key),
                )
                key += 1
        if layout == "pods":
            rel = f"test_dense/{instance}/d0.jpg"
            photo(root / rel, key)
            save_mask(root / f"test_dense_masks/{instance}/d0.png", box_mask(key))
            expected[rel] = dict(
                instance_id=instance,
                category=category,
                role="real_test",
                split="test_dense",
                instance_split=split,
                mask=box_mask(key),
            )
            key += 1
    classes = sorted(instances)
    info = {
        "classes": classes,
        "class_to_idx": {c: i for i, c in enumerate(classes)},
        "class_to_sc": {c: instances[c][0] for c in classes},
        "class_to_split": {c: instances[c][1] for c in classes},
    }
    (root / f"{layout}_info.json").write_text(json.dumps(info))
    if annos:
        (root / f"{layout}_image_annos.json").write_text(json.dumps(annos_json))
    return expected


def check_rows(rows: list[dict], expected: dict[str, dict], root: Path) -> None:
    by_id = {make_image_id("real", rel): rel for rel in expected}
    assert sorted(r["image_id"] for r in rows) == sorted(by_id)
    for row in rows:
        rel = by_id[row["image_id"]]
        want = expected[rel]
        for field in ("instance_id", "category", "role", "split", "instance_split"):
            assert row[field] == want[field], (rel, field)
        assert row["source"] == "real" and (row["width"], row["height"]) == (W, H)
        with Image.open(root / rel) as original:
            np.testing.assert_array_equal(np.asarray(decode_image(row["image"])), np.asarray(original.convert("RGB")))
        if want["mask"] is None:
            assert row["mask"] is None, rel
        else:
            np.testing.assert_array_equal(decode_mask(row["mask"]), want["mask"], err_msg=rel)


@pytest.mark.parametrize("annos", ["relpath", "stem"])
def test_pods_reader(tmp_path, annos):
    expected = write_dataset(tmp_path, "pods", annos=annos)
    assert detect_layout(tmp_path) == "pods"
    rows, instances = read_dataset(tmp_path)
    assert instances == {i: {"category": c, "split": s} for i, (c, s) in INSTANCES.items()}
    check_rows(rows, expected, tmp_path)
    assert Counter(r["split"] for r in rows)["test_dense"] == 3


def test_masks_pair_by_stem_not_listing_order(tmp_path):
    expected = write_dataset(tmp_path, "pods")
    (tmp_path / "train_masks/mug_a/00.png").unlink()  # the first image loses its mask; the rest keep theirs
    expected["train/mug_a/00.jpg"]["mask"] = None
    rows, _ = read_dataset(tmp_path)
    check_rows(rows, expected, tmp_path)


@pytest.mark.parametrize("layout", ["dogs", "df2"])
def test_dogs_and_df2_readers_without_annos(tmp_path, layout):
    expected = write_dataset(tmp_path, layout, annos="")
    assert detect_layout(tmp_path) == layout
    rows, instances = read_dataset(tmp_path)
    check_rows(rows, expected, tmp_path)
    assert {r["split"] for r in rows if r["role"] == "real_test"} == {"in_distribution"}
    assert len(instances) == 3


def test_dogs_reader_uses_annos_when_given(tmp_path):
    expected = write_dataset(tmp_path, "dogs", annos="relpath")
    rows, _ = read_dataset(tmp_path, layout="dogs")
    check_rows(rows, expected, tmp_path)


def test_folder_layout(tmp_path):
    root = tmp_path / "my_mug"
    for k, name in enumerate(["IMG_2.jpg", "IMG_1.png", "IMG_3.jpeg"]):
        photo(root / name, k)
    save_mask(root / "masks/IMG_3.png", box_mask(7))  # only one photo has a mask
    (root / "notes.txt").write_text("not an image")
    assert detect_layout(root) == "folder"
    rows, instances = read_dataset(root, category="mug")
    assert instances == {"my_mug": {"category": "mug", "split": "user"}}
    assert {(r["role"], r["split"], r["instance_split"], r["instance_id"]) for r in rows} == {
        ("real_train", "train", "user", "my_mug")
    }
    masks = {r["image_id"]: r["mask"] for r in rows}
    assert sum(m is not None for m in masks.values()) == 1
    np.testing.assert_array_equal(decode_mask(masks[make_image_id("real", "IMG_3.jpeg")]), box_mask(7))
    rows, instances = read_dataset(root, category="mug", instance_id="blue_mug")
    assert list(instances) == ["blue_mug"] and {r["instance_id"] for r in rows} == {"blue_mug"}
    with pytest.raises(DatasetError, match="pass data.category=NAME"):
        read_dataset(root)


def test_explicit_layout_without_info_file(tmp_path):
    photo(tmp_path / "a.jpg", 0)
    with pytest.raises(DatasetError, match=r"pods_info.json: missing"):
        read_dataset(tmp_path, layout="pods")
    with pytest.raises(DatasetError, match="not a folder"):
        read_dataset(tmp_path / "nope")


def _error_text(root: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as error:
        read_dataset(root, **kwargs)
    return str(error.value)


def test_bad_inputs_are_all_reported_at_once(tmp_path):
    write_dataset(tmp_path, "pods")
    (tmp_path / "train/mug_a/01.jpg").write_bytes(b"")  # zero-byte
    (tmp_path / "train/mug_a/02.jpg").write_text("<html>not an image</html>")  # non-image, image extension
    data = (tmp_path / "test/mug_b/mug_b_pose_0.png").read_bytes()
    (tmp_path / "test/mug_b/mug_b_pose_0.png").write_bytes(data[: len(data) // 2])  # truncated
    save_mask(tmp_path / "train_masks/mug_b/00.png", np.ones((H + 2, W), dtype=bool))  # wrong size
    save_mask(tmp_path / "train_masks/mug_b/01.png", np.zeros((H, W), dtype=bool))  # no object
    save_mask(tmp_path / "train_masks/mug_b/zz.png", box_mask(1))  # orphan mask
    (tmp_path / "test_dense_masks/tote_a/d0.png").unlink()  # dense image without mask
    photo(tmp_path / "outside.jpg", 99)
    (tmp_path / "train/tote_a/link.jpg").symlink_to(tmp_path.parent / "escape.jpg")
    photo(tmp_path.parent / "escape.jpg", 98)
    photo(tmp_path / "train/stray_instance/0.jpg", 97)  # a folder not in the info file
    text = _error_text(tmp_path)
    for needle in (
        "01.jpg: image is an empty (zero-byte) file",
        "02.jpg: not a readable image",
        "mug_b_pose_0.png: image is corrupt or truncated",
        "mug_b/00.png: mask is 24x18",
        "mug_b/01.png: mask has no object",
        "zz.png: no image with stem 'zz'",
        "d0.jpg: needs a mask",
        "link.jpg: resolves to",
        "stray_instance: instance not in pods_info.json",
    ):
        assert needle in text, needle
    assert text.startswith("9 problem(s)")


def test_train_image_counts(tmp_path):
    write_dataset(tmp_path, "pods", train=1)
    for k in range(1, 51):
        photo(tmp_path / f"train/mug_a/x{k}.png", k)
    assert "'mug_a' has 51 train photos" in _error_text(tmp_path)
    for path in (tmp_path / "train/mug_b").iterdir():
        path.unlink()
    assert "'mug_b' has 0 train photos" in _error_text(tmp_path)


def test_annos_problems(tmp_path):
    write_dataset(tmp_path, "pods")
    annos_path = tmp_path / "pods_image_annos.json"
    annos = json.loads(annos_path.read_text())
    del annos["test/mug_a/mug_a_pose_0.png"]
    annos["test/mug_a/mug_a_pose_1.png"]["test_split"] = "sideways"
    annos["test/tote_a/tote_a_pose_1.png"]["class"] = "mug_a"
    annos_path.write_text(json.dumps(annos))
    text = _error_text(tmp_path)
    assert "mug_a_pose_0.png: no entry in pods_image_annos.json" in text
    assert "test_split 'sideways'" in text and "class 'mug_a' but the image is in the folder of 'tote_a'" in text
    annos_path.unlink()
    assert "pods_image_annos.json: missing" in _error_text(tmp_path)


def test_info_file_problems(tmp_path):
    write_dataset(tmp_path, "df2", annos="")
    info = json.loads((tmp_path / "df2_info.json").read_text())
    info["class_to_split"]["mug_a"] = "train"
    (tmp_path / "df2_info.json").write_text(json.dumps(info))
    assert "class_to_split['mug_a'] is 'train'" in _error_text(tmp_path)
    del info["class_to_sc"]
    (tmp_path / "df2_info.json").write_text(json.dumps(info))
    assert "lacks keys ['class_to_sc']" in _error_text(tmp_path)
    (tmp_path / "df2_info.json").write_text("{broken")
    assert "cannot be read as JSON" in _error_text(tmp_path)


def test_duplicate_stems_are_rejected(tmp_path):
    write_dataset(tmp_path, "pods")
    photo(tmp_path / "train/mug_a/00.png", 5)
    assert "same file stem as 00.jpg" in _error_text(tmp_path)


def test_max_test_images_is_a_seeded_sample_per_split(tmp_path):
    write_dataset(tmp_path, "pods", per_split=4)
    first = scan_dataset(tmp_path, max_test_images=2, seed=0).entries
    assert first == scan_dataset(tmp_path, max_test_images=2, seed=0).entries
    counts = Counter((e.instance_id, e.split) for e in first if e.role == "real_test")
    assert set(counts.values()) == {1, 2}  # test_dense has one image, the others are cut to two
    assert sum(e.role == "real_train" for e in first) == 9
    seeds = {tuple(e.relpath for e in scan_dataset(tmp_path, max_test_images=2, seed=s).entries) for s in range(5)}
    assert len(seeds) > 1


def test_listing_tracks_the_files_read(tmp_path):
    write_dataset(tmp_path, "pods")
    listing = dataset_listing(tmp_path)
    assert (
        "pods_info.json",
        (tmp_path / "pods_info.json").stat().st_size,
        (tmp_path / "pods_info.json").stat().st_mtime_ns,
    ) in listing
    assert len(listing) == 2 + 2 * (9 + 24 + 3)
    photo(tmp_path / "train/mug_a/new.jpg", 50)
    assert len(dataset_listing(tmp_path)) == len(listing) + 1


def test_a_registered_layout_round_trips_through_config_detection_and_ingest(tmp_path, monkeypatch):
    """The docs' worked example (docs/extending.md, "A dataset layout"): one LAYOUTS entry, nothing else."""
    import dataclasses

    from personalization.config import ConfigError, build_config
    from personalization.datasets.layouts import LAYOUTS, make_info_layout
    from personalization.schema import read_image_table
    from pipelines import ingest

    with pytest.raises(ConfigError, match=r"data.layout: must be one of \['auto', 'pods', 'dogs', 'df2', 'folder'\]"):
        build_config({"data": {"layout": "cars"}})
    monkeypatch.setitem(LAYOUTS, "cars", make_info_layout("cars"))
    root = tmp_path / "cars"
    expected = write_dataset(root, "cars", annos="relpath")
    assert detect_layout(root) == "cars"
    assert ("cars_image_annos.json", "cars_info.json") == tuple(sorted(p for p, *_ in dataset_listing(root))[:2])
    out = ingest.run(build_config({"output_dir": str(tmp_path / "out"), "data": {"root": str(root), "layout": "cars"}}))
    check_rows(read_image_table(out).to_pylist(), expected, root)
    assert json.loads((out / "instances.json").read_text()) == {
        i: {"category": c, "split": s} for i, (c, s) in INSTANCES.items()
    }
    # A scanner reused under another name: a copy of the plain-folder layout, chosen explicitly.
    monkeypatch.setitem(LAYOUTS, "photos", dataclasses.replace(LAYOUTS["folder"], name="photos"))
    photo(tmp_path / "mug" / "a.jpg", 0)
    rows, instances = read_dataset(tmp_path / "mug", layout="photos", category="mug")
    assert instances == {"mug": {"category": "mug", "split": "user"}} and len(rows) == 1
