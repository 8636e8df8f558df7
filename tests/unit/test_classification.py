import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from personalization.evaluation.classification import compute_pr_curve, evaluate_classification


def naive_average_precision(targets, scores):
    """AP = sum over positives, in descending score order, of precision at that positive / #positives (no ties)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, index in enumerate(order, start=1):
        if targets[index]:
            hits += 1
            total += hits / rank
    return total / sum(targets)


def naive_scores(train, train_labels, test, instance):
    scores = []
    for x in test:
        best = -np.inf
        for t, label in zip(train, train_labels, strict=True):
            if label == instance:
                best = max(best, float(x @ t / np.linalg.norm(x) / np.linalg.norm(t)))
        scores.append(best)
    return scores


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    train_labels = np.repeat(np.array(["a", "b", "c", "d"]), 3)
    test_labels = np.repeat(np.array(["a", "b", "c", "d"]), 10)
    train = centres.repeat(3, axis=0) + rng.normal(scale=1.0, size=(12, 16))
    test = centres.repeat(10, axis=0) + rng.normal(scale=1.5, size=(40, 16))
    return train, train_labels, test, test_labels


def test_matches_naive_loop_and_sklearn(data):
    train, train_labels, test, test_labels = data
    for instance in "abcd":
        scores = naive_scores(train, train_labels, test, instance)
        targets = [label == instance for label in test_labels]
        result = evaluate_classification(train, train_labels, test, test_labels, instance)
        assert result["pr_auc"] == pytest.approx(naive_average_precision(targets, scores), abs=1e-12)
        assert result["pr_auc"] == pytest.approx(average_precision_score(targets, scores), abs=1e-12)
        assert 0.0 < result["pr_auc"] <= 1.0


def test_hand_computed_ranking():
    # Scores (cosine to the single train vector e0) descend: pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2.
    train, train_labels = np.array([[1.0, 0.0]]), np.array(["x"])
    angles = np.array([0.1, 0.2, 0.3, 0.4])
    test = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    test_labels = np.array(["x", "y", "x", "y"])
    assert evaluate_classification(train, train_labels, test, test_labels, "x")["pr_auc"] == pytest.approx(5 / 6)


def test_perfect_separation_and_pr_curve(data):
    train, train_labels, _, _ = data
    test = np.concatenate([train[:3] * 2.0, -train[3:]])  # instance a: its own train images; others: opposite
    test_labels = train_labels
    assert evaluate_classification(train, train_labels, test, test_labels, "a")["pr_auc"] == pytest.approx(1.0)
    precision, recall = compute_pr_curve(train, train_labels, test, test_labels, "a")
    assert precision.shape == recall.shape and recall.max() == 1.0


def test_missing_instance_fails_clearly(data):
    train, train_labels, test, test_labels = data
    with pytest.raises(ValueError, match="no train embeddings"):
        evaluate_classification(train, train_labels, test, test_labels, "zzz")
