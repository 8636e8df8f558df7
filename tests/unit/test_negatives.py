"""train.negatives=auto resolution and the stock negatives."""

from __future__ import annotations

import pytest

from personalization.config import build_config
from personalization.contrastive.negatives import STOCK_PHOTOS, choose_negatives, load_stock_negatives
from personalization.errors import UserError
from personalization.schema import decode_image

TOY = {
    "mug_00": {"category": "mug", "split": "val"},
    "mug_01": {"category": "mug", "split": "test"},
    "tote_00": {"category": "tote", "split": "test"},
}
LONE = {"my_mug": {"category": "mug", "split": "user"}}


def _choose(instances, selected, **train):
    cfg = build_config({"train": train})
    return choose_negatives(cfg.train, cfg.generate, instances, selected)


def test_auto_takes_val_instances_of_the_category():
    assert _choose(TOY, ["mug_01"]) == "val"


def test_auto_needs_val_for_every_instance_trained():
    with pytest.raises(UserError, match=r"\['tote_00'\] \(category tote\)"):
        _choose(TOY, ["mug_01", "tote_00"])
    with pytest.raises(UserError, match="mug_00"):  # a val instance is not its own negative
        _choose(TOY, ["mug_00"])


def test_auto_on_a_lone_folder_names_every_fix(tmp_path):
    with pytest.raises(UserError) as error:
        _choose(LONE, ["my_mug"])
    message = str(error.value)
    for fix in ("train.negatives_dir=DIR", "do not show your object", "train.stock_negatives=true", "generate"):
        assert fix in message
    assert _choose(LONE, ["my_mug"], negatives_dir=str(tmp_path)) == "folder"
    assert _choose(LONE, ["my_mug"], stock_negatives=True) == "stock"


def test_generation_comes_first_and_explicit_modes_stay():
    cfg = build_config({"generate": {"enabled": True}, "train": {"stock_negatives": True}})
    assert choose_negatives(cfg.train, cfg.generate, TOY, ["mug_01"]) == "generated"
    assert _choose(LONE, ["my_mug"], negatives="stock") == "stock"
    assert _choose(LONE, ["my_mug"], negatives="val") == "val"  # explicit: the triplet sampler reports empties
    with pytest.raises(UserError, match="negatives=generated needs generate.enabled=true"):
        _choose(TOY, ["mug_01"], negatives="generated")


def test_negatives_dir_must_be_a_folder(tmp_path):
    with pytest.raises(Exception, match="train.negatives_dir"):
        build_config({"train": {"negatives_dir": str(tmp_path / "nope")}})


def test_stock_negatives_are_real_rgb_photos_and_crops():
    table = load_stock_negatives("mug")
    assert table.num_rows == 5 * len(STOCK_PHOTOS)
    assert set(table["role"].to_pylist()) == {"negative"} and set(table["category"].to_pylist()) == {"mug"}
    assert len(set(table["image_id"].to_pylist())) == table.num_rows
    first = decode_image(table["image"][0].as_py())
    assert first.mode == "RGB" and max(first.size) == 512
    assert max(table["width"].to_pylist()) <= 512 and min(table["height"].to_pylist()) >= 64
