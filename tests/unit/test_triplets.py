from collections import Counter

import pytest

from personalization.contrastive.triplets import TripletError, compute_quotas, sample_triplets

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


# ---------------------------------------------------------------------------------------------------------------
# train.source_weights: each positive source's share of the triplets


def _weighted_plan(tables, weights, **kwargs):
    from personalization.config import TrainConfig
    from personalization.contrastive.data import select_training_rows

    images, synthetic, instances = tables
    cfg = TrainConfig(positive_sources=("real", "cutpaste"), source_weights=weights, negatives="val")
    rows = select_training_rows(images, synthetic, "mug_1", cfg, instances)
    args = dict(num_triplets=1000, seed=0, instance_id="mug_1") | kwargs
    triplets = sample_triplets(
        rows.anchor_ids, rows.positive_ids, rows.negative_ids, positive_groups=rows.positive_ids_by_source,
        source_weights=cfg.source_weights, **args,
    )  # fmt: skip
    return rows, triplets


def _source_counts(rows, triplets):
    source_of = {i: s for s, ids in rows.positive_ids_by_source.items() for i in ids}
    return Counter(source_of[p] for _, p, _ in triplets)


def test_source_weights_set_each_sources_share_of_the_triplets(tables):
    rows, triplets = _weighted_plan(tables, {"real": 1, "cutpaste": 3})
    assert {s: len(ids) for s, ids in rows.positive_ids_by_source.items()} == {"real": 3, "cutpaste": 4}
    assert rows.positive_ids_by_source["real"] == rows.anchor_ids
    assert _source_counts(rows, triplets) == {"real": 250, "cutpaste": 750}  # 1 : 3 of 1000, exactly
    assert {p for _, p, _ in triplets} == set(rows.positive_ids)  # every image of both sources is drawn
    # The plain union draws images uniformly: real gets 3 of 7, about 430 of 1000.
    _, union = _weighted_plan(tables, {})
    assert 380 <= _source_counts(rows, union)["real"] <= 480
    # Deterministic with the seed; another seed draws other triplets with the same shares.
    assert _weighted_plan(tables, {"real": 1, "cutpaste": 3})[1] == triplets
    other = _weighted_plan(tables, {"real": 1, "cutpaste": 3}, seed=1)[1]
    assert other != triplets and _source_counts(rows, other) == {"real": 250, "cutpaste": 750}
    # Odd totals round to the nearest whole triplet; a weight of 0 leaves the source out.
    assert _source_counts(rows, _weighted_plan(tables, {"real": 2, "cutpaste": 1}, num_triplets=100)[1]) == {
        "real": 67, "cutpaste": 33,
    }  # fmt: skip
    assert _source_counts(rows, _weighted_plan(tables, {"real": 0, "cutpaste": 1})[1]) == {"cutpaste": 1000}


def test_source_weights_share_the_pairs_too(tables):
    rows, triplets = _weighted_plan(tables, {"real": 1, "cutpaste": 3}, num_pairs=8)
    assert _source_counts(rows, triplets) == {"real": 250, "cutpaste": 750}
    pairs = {(a, p) for a, p, _ in triplets}
    real = set(rows.positive_ids_by_source["real"])
    assert len([1 for _, p in pairs if p in real]) == 2 and len([1 for _, p in pairs if p not in real]) == 6


def test_a_weighted_source_without_images_is_a_clear_error():
    with pytest.raises(TripletError, match="source_weights gives dreambooth weight 1.0"):
        sample_triplets(
            ANCHORS, POSITIVES, NEGATIVES, num_triplets=10, positive_groups={"real": ANCHORS, "cutpaste": POSITIVES},
            source_weights={"cutpaste": 1.0, "dreambooth": 1.0},
        )  # fmt: skip


def test_compute_quotas_matches_the_exact_shares():
    import random

    rng = random.Random(0)
    for _ in range(200):
        weights = {f"s{k}": rng.choice([0, 0.5, 1, 2, 3.7]) for k in range(rng.randint(1, 4))}
        if not sum(weights.values()):
            continue
        total = rng.randint(0, 500)
        quotas = compute_quotas(total, weights)
        assert sum(quotas.values()) == total
        for key, weight in weights.items():
            assert abs(quotas[key] - total * weight / sum(weights.values())) < 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.source_weights={real: 1}"], "one weight to each of train.positive_sources"),
        (["train.positive_sources=[real]", "train.source_weights={real: 0}"], "not all 0"),
        (["train.source_weights=3"], "must be a mapping"),
        (["train.source_weights={cutpaste: many}"], "train.source_weights.cutpaste: must be a number"),
    ],
)
def test_source_weights_config_errors_name_the_key(overrides, message):
    from personalization.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_source_weights_from_yaml_and_default(tmp_path):
    from personalization.config import load_config

    assert load_config().train.source_weights == {}
    path = tmp_path / "ratio.yaml"
    path.write_text("train:\n  positive_sources: [real, cutpaste]\n  source_weights: {real: 1, cutpaste: 3}\n")
    assert load_config(path).train.source_weights == {"real": 1.0, "cutpaste": 3.0}
