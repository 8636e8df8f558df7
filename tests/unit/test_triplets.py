from collections import Counter

import pytest

from personalization.contrastive.triplets import TripletError, sample_triplets

ANCHORS = [f"a{i}" for i in range(3)]
POSITIVES = [f"p{i}" for i in range(40)]
NEGATIVES = [f"n{i}" for i in range(60)]


def _sample(**kwargs):
    args = dict(num_triplets=500, seed=3)
    args.update(kwargs)
    return sample_triplets(ANCHORS, POSITIVES, NEGATIVES, **args)


def test_deterministic_per_seed_and_count():
    assert _sample() == _sample()
    assert _sample() != _sample(seed=4)
    assert len(_sample(num_triplets=17)) == 17


def test_roles_never_leak():
    for anchor, positive, negative in _sample(num_positives=5, num_negatives=7, num_pairs=4):
        assert anchor in ANCHORS and positive in POSITIVES and negative in NEGATIVES


def test_pools_are_capped_to_a_seeded_subset():
    triplets = _sample(num_positives=5, num_negatives=7)
    assert len({p for _, p, _ in triplets}) == 5
    assert len({n for _, _, n in triplets}) == 7
    assert {p for _, p, _ in triplets} == {p for _, p, _ in _sample(num_positives=5, num_negatives=7)}


def test_zero_caps_use_every_image():
    triplets = _sample(num_triplets=5000)
    assert {a for a, _, _ in triplets} == set(ANCHORS)
    assert {p for _, p, _ in triplets} == set(POSITIVES)
    assert {n for _, _, n in triplets} == set(NEGATIVES)


def test_num_pairs_cycles_over_distinct_pairs():
    triplets = _sample(num_triplets=100, num_pairs=6)
    pairs = [(a, p) for a, p, _ in triplets]
    assert len(set(pairs)) == 6
    assert pairs[:6] == pairs[6:12]  # triplet k uses pair k mod num_pairs
    assert all(count in (16, 17) for count in Counter(pairs).values())


def test_num_pairs_larger_than_all_pairs_uses_each_once_per_cycle():
    triplets = sample_triplets(["a"], ["p1", "p2"], ["n"], num_triplets=4, num_pairs=10, seed=0)
    assert Counter((a, p) for a, p, _ in triplets) == {("a", "p1"): 2, ("a", "p2"): 2}


def test_with_replacement_like_the_reference():
    triplets = sample_triplets(["a"], ["p"], ["n"], num_triplets=5, seed=0)
    assert triplets == [("a", "p", "n")] * 5


def test_real_positives_may_be_anchors():
    triplets = sample_triplets(["a", "b"], ["a", "b", "p"], ["n"], num_triplets=20, seed=0)
    assert {p for _, p, _ in triplets} <= {"a", "b", "p"}


def test_empty_pools_fail_with_the_fix():
    with pytest.raises(TripletError, match="instance mug_1 has no real train images"):
        sample_triplets([], POSITIVES, NEGATIVES, num_triplets=3, seed=0, instance_id="mug_1")
    with pytest.raises(TripletError, match="no synthetic positives for instance mug_1: enable cutpaste or generate"):
        sample_triplets(ANCHORS, [], NEGATIVES, num_triplets=3, seed=0, instance_id="mug_1")
    with pytest.raises(TripletError, match="train.negatives=val"):
        sample_triplets(ANCHORS, POSITIVES, [], num_triplets=3, seed=0, instance_id="mug_1")


def test_a_negative_that_is_an_anchor_is_rejected():
    with pytest.raises(TripletError, match="also anchors/positives"):
        sample_triplets(ANCHORS, POSITIVES, ["a0", "n1"], num_triplets=3, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# From ids to pixels: row selection and the triplet dataset


def _rows(instance, category, split, role, source, n, color):
    import numpy as np
    from PIL import Image

    from personalization.schema import make_image_id, make_row

    return [
        make_row(
            image_id=make_image_id(source, role, instance, k),
            instance_id=instance,
            category=category,
            role=role,
            source=source,
            instance_split=split,
            image=Image.fromarray(np.full((20, 30, 3), color + k, np.uint8)),
        )  # fmt: skip
        for k in range(n)
    ]


@pytest.fixture
def tables():
    from personalization.schema import rows_to_table

    instances = {
        "mug_1": {"category": "mug", "split": "test"},
        "mug_2": {"category": "mug", "split": "test"},
        "mug_v": {"category": "mug", "split": "val"},
        "shoe_v": {"category": "shoe", "split": "val"},
    }
    images, synthetic = [], []
    for k, (name, info) in enumerate(instances.items()):
        images += _rows(name, info["category"], info["split"], "real_train", "real", 3, 10 * k)
        synthetic += _rows(name, info["category"], info["split"], "positive", "cutpaste", 4, 10 * k)
        synthetic += _rows(name, info["category"], info["split"], "positive", "dreambooth", 2, 10 * k)
    synthetic += _rows("mug_neg", "mug", "", "negative", "pretrained", 5, 200)
    synthetic += _rows("shoe_neg", "shoe", "", "negative", "pretrained", 5, 220)
    return rows_to_table(images), rows_to_table(synthetic), instances


def _instances_of(rows, ids):
    lookup = dict(zip(rows.table["image_id"].to_pylist(), rows.table["instance_id"].to_pylist(), strict=True))
    sources = dict(zip(rows.table["image_id"].to_pylist(), rows.table["source"].to_pylist(), strict=True))
    return {lookup[i] for i in ids}, {sources[i] for i in ids}


def test_val_negatives_never_include_other_test_instances(tables):
    from personalization.config import TrainConfig
    from personalization.contrastive.data import select_training_rows

    images, synthetic, instances = tables
    rows = select_training_rows(images, synthetic, "mug_1", TrainConfig(negatives="val"), instances)
    assert _instances_of(rows, rows.anchor_ids) == ({"mug_1"}, {"real"})
    assert _instances_of(rows, rows.positive_ids) == ({"mug_1"}, {"cutpaste"})
    assert _instances_of(rows, rows.negative_ids) == ({"mug_v"}, {"real", "cutpaste"})
    assert len(rows.negative_ids) == 3 + 4 and rows.table.num_rows == 3 + 4 + 7


def test_positive_sources_and_generated_negatives(tables):
    from personalization.config import TrainConfig
    from personalization.contrastive.data import select_training_rows

    images, synthetic, instances = tables
    cfg = TrainConfig(positive_sources=("dreambooth", "real"), negatives="generated")
    rows = select_training_rows(images, synthetic, "mug_1", cfg, instances)
    assert _instances_of(rows, rows.positive_ids) == ({"mug_1"}, {"dreambooth", "real"})
    assert set(rows.anchor_ids) <= set(rows.positive_ids) and len(rows.positive_ids) == 2 + 3
    assert _instances_of(rows, rows.negative_ids) == ({"mug_neg"}, {"pretrained"})
    assert rows.table.num_rows == len(set(rows.table["image_id"].to_pylist()))  # anchors not duplicated
    with pytest.raises(KeyError, match="not in instances.json"):
        select_training_rows(images, synthetic, "cup_9", cfg, instances)


@pytest.mark.parametrize("nested", [True, False])
def test_folder_negatives_accept_both_layouts(tables, tmp_path, nested):
    import numpy as np
    from PIL import Image

    from personalization.config import TrainConfig
    from personalization.contrastive.data import select_training_rows

    folder = tmp_path / "mug_negatives" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    for k in range(3):
        Image.fromarray(np.full((12, 16, 3), k, np.uint8)).save(folder / f"{k}.jpg")
    (folder / "notes.txt").write_text("not an image")
    images, synthetic, instances = tables
    cfg = TrainConfig(negatives="folder", negatives_dir=str(tmp_path))
    rows = select_training_rows(images, synthetic, "mug_1", cfg, instances)
    assert len(rows.negative_ids) == 3
    assert _instances_of(rows, rows.negative_ids)[1] == {"pretrained"}


def test_triplet_dataset_returns_transformed_triplets_and_decodes_once(tables):
    from torchvision import transforms

    from personalization.config import TrainConfig
    from personalization.contrastive.data import TripletDataset, select_training_rows

    images, synthetic, instances = tables
    rows = select_training_rows(images, synthetic, "mug_1", TrainConfig(negatives="val"), instances)
    triplets = sample_triplets(rows.anchor_ids, rows.positive_ids, rows.negative_ids, num_triplets=20, seed=0)
    dataset = TripletDataset(rows.table, triplets, transforms.ToTensor(), max_side=15)
    assert len(dataset) == 20
    anchor, positive, negative = dataset[0]
    assert anchor.shape == positive.shape == negative.shape == (3, 10, 15)  # 20x30 shrunk to fit 15
    first = dataset.image(triplets[0][0])
    for k in range(len(dataset)):
        dataset[k]
    assert dataset.image(triplets[0][0]) is first  # cached, not decoded again
    assert set(dataset._decoded) == {i for t in triplets for i in t}
    with pytest.raises(KeyError, match="not in the image table"):
        TripletDataset(rows.table, [("a", "b", "c")], transforms.ToTensor())
