"""Per-split metrics (PODS test splits): the measure against sklearn and a naive NDCG loop, the summary's means,
the image sets' split column and the report's table."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from personalization import schema
from personalization.evaluation.images import EvaluationImages, load_evaluation_images
from personalization.evaluation.measure import compute_embedding_metrics, compute_split_metrics
from personalization.evaluation.outputs import write_summary
from personalization.evaluation.report import render_metrics_table

# Hand-made score table: (image id, owner, split, angle in degrees of its 2-d embedding). Instance a's one train
# image is at 0 deg, b's at 90 deg, so the score of a test image for a (max cosine) is cos(angle).
TEST = [
    ("t0", "a", "in_distribution", 10), ("t1", "a", "in_distribution", 70), ("t2", "b", "in_distribution", 40),
    ("t3", "b", "in_distribution", 80), ("t4", "a", "pose", 50), ("t5", "b", "pose", 20), ("t6", "b", "pose", 85),
    ("t7", "b", "distractors", 30),
]  # fmt: skip
TRAIN = [("r0", "a", 0), ("r1", "b", 90), ("r2", "b", 95)]


def unit(angle):
    return np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])


@pytest.fixture
def table():
    embeddings = {i: unit(angle) for i, _, _, angle in TEST} | {i: unit(angle) for i, _, angle in TRAIN}
    owner = {i: o for i, o, *_ in TEST} | {i: o for i, o, _ in TRAIN}
    sets = EvaluationImages(
        train=[i for i, *_ in TRAIN], test=[i for i, *_ in TEST], dense=[], owner=owner,
        size=dict.fromkeys(owner, (8, 8)), masked=frozenset(), split={i: s for i, _, s, _ in TEST},
    )  # fmt: skip
    return embeddings, sets


def naive_ndcg(query, gallery_ids, embeddings, owner, instance):
    """NDCG of one query by a plain loop over the ranking (binary relevance, 1 / log2(rank + 1))."""
    ranked = sorted(gallery_ids, key=lambda g: -float(embeddings[query] @ embeddings[g]))
    dcg = sum(1 / math.log2(r + 1) for r, g in enumerate(ranked, 1) if owner[g] == instance)
    ideal = sum(1 / math.log2(r + 1) for r in range(1, sum(owner[g] == instance for g in gallery_ids) + 1))
    return dcg / ideal


def test_split_pr_auc_and_ndcg_match_sklearn_and_a_naive_loop(table):
    embeddings, sets = table
    assert sets.test_splits() == ["in_distribution", "pose", "distractors"]  # TEST_SPLITS order, present only
    found = compute_split_metrics(embeddings, sets, "a", ("classification", "retrieval"))
    assert list(found) == ["in_distribution", "pose", "distractors"]
    for split in ("in_distribution", "pose"):
        rows = [r for r in TEST if r[2] == split]
        labels = [owner == "a" for _, owner, _, _ in rows]
        scores = [math.cos(math.radians(angle)) for *_, angle in rows]  # max cosine to a's one train image
        assert found[split]["classification/pr_auc"] == pytest.approx(average_precision_score(labels, scores))
        queries = [i for i, owner, _, _ in rows if owner == "a"]
        ndcg = np.mean([naive_ndcg(q, sets.train, embeddings, sets.owner, "a") for q in queries])
        assert found[split]["retrieval/ndcg"] == pytest.approx(ndcg)
    # in_distribution: a's t0 (cos 10) ranks first, t1 (cos 70) after b's t2 (cos 40): AP = (1 + 2/3) / 2.
    assert found["in_distribution"]["classification/pr_auc"] == pytest.approx(5 / 6)
    assert found["pose"]["classification/pr_auc"] == pytest.approx(1 / 2)  # b's t5 (cos 20) outranks a's t4
    # distractors holds no image of a: undefined, NaN (skipped by the means).
    assert all(math.isnan(v) for v in found["distractors"].values())
    assert list(found["distractors"]) == ["classification/pr_auc", "retrieval/ndcg", "retrieval/mrr", "retrieval/top10"]
    pooled, _curve = compute_embedding_metrics(embeddings, sets, "a", ("classification", "retrieval"))
    labels = [owner == "a" for _, owner, _, _ in TEST]
    scores = [math.cos(math.radians(angle)) for *_, angle in TEST]
    assert pooled["classification/pr_auc"] == pytest.approx(average_precision_score(labels, scores))
    assert pooled["classification/pr_auc"] != pytest.approx(found["pose"]["classification/pr_auc"])


def test_no_splits_no_split_metrics(table):
    embeddings, sets = table
    plain = EvaluationImages(sets.train, sets.test, [], sets.owner, sets.size, sets.masked)
    assert plain.test_splits() == [] and compute_split_metrics(embeddings, plain, "a", ("classification",)) == {}
    assert compute_split_metrics(embeddings, sets, "a", ("detection",)) == {}


def test_load_evaluation_images_keeps_each_test_images_split(tmp_path):
    rows = [("a", "real_train", "train"), ("a", "real_test", "pose"), ("b", "real_test", "distractors"),
            ("a", "real_test", "test_dense")]  # fmt: skip
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    made = [schema.make_row(image_id=f"{i}-{s}", instance_id=i, category="mug", role=r, source="real", split=s,
                            image=image, mask=np.ones((8, 8), bool)) for i, r, s in rows]  # fmt: skip
    schema.write_image_table(made, tmp_path / "images.parquet")
    sets = load_evaluation_images(tmp_path / "images.parquet", {"a": {"split": "test"}, "b": {"split": "test"}})
    assert sets.split == {"a-pose": "pose", "b-distractors": "distractors"}  # dense and train images have none
    assert sets.test_splits() == ["pose", "distractors"]


def test_summary_and_report_hold_the_split_means(tmp_path):
    units = {"pretrained": {}, "personalized": {}}
    values = {"a": (0.2, 0.6), "b": (0.4, math.nan)}  # (pose, distractors) PR-AUC of the personalized encoder
    for model in units:
        for instance, (pose, distractors) in values.items():
            folder = tmp_path / model / instance
            folder.mkdir(parents=True)
            split_metrics = {
                "pose": {"classification/pr_auc": pose},
                "distractors": {"classification/pr_auc": distractors},
            }
            result = {"metrics": {"classification/pr_auc": 0.5}, "curve": None, "split_metrics": split_metrics,
                      "predictions": [], "example": None}  # fmt: skip
            (folder / "result.json").write_text(json.dumps(result))
            units[model][instance] = folder
    out = tmp_path / "summary"
    out.mkdir()
    write_summary(out, units)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["pretrained", "personalized", "per_instance", "per_split"]
    assert metrics["personalized"] == {"classification/pr_auc": 0.5}  # the pooled means, as before
    assert metrics["per_split"]["personalized"]["pose"]["classification/pr_auc"] == pytest.approx(0.3)
    assert metrics["per_split"]["personalized"]["distractors"]["classification/pr_auc"] == pytest.approx(0.6)
    assert list(metrics["per_split"]["pretrained"]) == ["pose", "distractors"]
    page = render_metrics_table(metrics)
    assert "Per test split" in page and "<td>pose</td><td>0.3000 / 0.3000</td>" in page
    assert "Per test split" not in render_metrics_table({k: metrics[k] for k in ("pretrained", "personalized")})
