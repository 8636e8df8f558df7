"""The sweep's split of val objects into probes (trained and scored) and a negatives pool."""

import pytest

from personalization.errors import UserError
from personalization.val_probes import PROBE_SPLIT, hide_probes, partition_val


def _instances(**per_category):
    """``mug=3, tote=2`` -> 3 val mugs, 2 val totes, and one test object per category."""
    instances = {}
    for category, count in per_category.items():
        instances.update({f"{category}_{k:02d}": {"category": category, "split": "val"} for k in range(count)})
        instances[f"{category}_test"] = {"category": category, "split": "test"}
    return instances


def test_partition_is_deterministic_disjoint_and_sized():
    instances = _instances(mug=3, tote=2, bottle=4)
    val = {i for i, info in instances.items() if info["split"] == "val"}
    split = partition_val(instances, count=3, seed=0, needs_pool=True)
    assert split == partition_val(instances, count=3, seed=0, needs_pool=True)
    assert len(split.probes) == 3 and set(split.probes).isdisjoint(split.pool)
    assert set(split.probes) | set(split.pool) == val  # test objects never take part
    # Every probe keeps a pool object of its category to train against.
    for probe in split.probes:
        category = instances[probe]["category"]
        assert any(instances[p]["category"] == category for p in split.pool)
    # Another seed draws other probes (of 9 val objects, some seed in 0..9 must differ).
    assert any(partition_val(instances, 3, seed, True).probes != split.probes for seed in range(1, 10))


def test_partition_caps_probes_at_what_the_pool_allows():
    instances = _instances(mug=2, tote=2)
    split = partition_val(instances, count=3, seed=0, needs_pool=True)
    # One probe per category: the other object of each category is its negatives.
    assert sorted(instances[p]["category"] for p in split.probes) == ["mug", "tote"]
    assert sorted(instances[p]["category"] for p in split.pool) == ["mug", "tote"]
    # Without val negatives no pool is needed: all four may be probes, capped by count.
    assert len(partition_val(instances, count=3, seed=0, needs_pool=False).probes) == 3
    assert len(partition_val(instances, count=10, seed=0, needs_pool=False).probes) == 4


def test_too_few_val_objects_name_the_count_and_the_fix():
    with pytest.raises(UserError, match=r"2 val objects \(mug: 1, tote: 1\) allow only 0 probes.*train\.negatives="):
        partition_val(_instances(mug=1, tote=1), count=3, seed=0, needs_pool=True)
    with pytest.raises(UserError, match=r"1 val objects \(mug: 1\) allow only 1 probes.*add val objects"):
        partition_val(_instances(mug=1), count=3, seed=0, needs_pool=False)


def test_chosen_probes_are_kept_or_refused():
    instances = _instances(mug=3, tote=2)
    split = partition_val(instances, count=3, seed=0, needs_pool=True, chosen=["mug_00", "tote_01"])
    assert split.probes == ("mug_00", "tote_01") and split.pool == ("mug_01", "mug_02", "tote_00")
    with pytest.raises(UserError, match=r"\['mug_test'\] are not val objects"):
        partition_val(instances, count=3, seed=0, needs_pool=True, chosen=["mug_00", "mug_test"])
    with pytest.raises(UserError, match="allow only 2 probes of data.instances"):  # no tote left for the pool
        partition_val(instances, count=3, seed=0, needs_pool=True, chosen=["mug_00", "tote_00", "tote_01"])


def test_hide_probes_moves_only_the_probes_out_of_val():
    instances = _instances(mug=3)
    view = hide_probes(instances, ["mug_00", "mug_02"])
    assert {i for i, info in view.items() if info["split"] == PROBE_SPLIT} == {"mug_00", "mug_02"}
    assert view["mug_01"] == instances["mug_01"] and view["mug_test"]["split"] == "test"
    assert instances["mug_00"]["split"] == "val"  # the input is not changed


def test_val_negatives_of_a_probe_come_from_the_pool_only_in_the_training_view():
    from PIL import Image

    from personalization.config import build_config
    from personalization.contrastive.data import select_training_rows
    from personalization.schema import make_row, rows_to_table

    instances = _instances(mug=4)
    photo = Image.new("RGB", (8, 8))
    images = rows_to_table([make_row(image_id=i, instance_id=i, category="mug", role="real_train", source="real",
                                     image=photo) for i in instances])  # fmt: skip
    train_cfg = build_config({"train": {"negatives": "val", "positive_sources": ["real"]}}).train
    split = partition_val(instances, count=2, seed=0, needs_pool=True)
    probe, other = split.probes

    def negatives(view):
        return set(select_training_rows(images, images.schema.empty_table(), probe, train_cfg, view).negative_ids)

    assert other in negatives(instances)  # the dataset as it is: the other probe would be a negative
    assert negatives(hide_probes(instances, split.probes)) == set(split.pool)
