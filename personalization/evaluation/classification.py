"""Personalized classification: is a test image the user's object? Reported as PR-AUC (average precision).

For an instance with train embeddings ``T`` (k, D) and test embeddings ``X`` (N, D), all L2-normalized, the
score of test image n is ``s_n = max_j <X_n, T_j>`` (max cosine to the instance's real photos). The label is
``y_n = (test_label_n == instance)``; PR-AUC = ``sklearn.metrics.average_precision_score(y, s)``. The test set
holds the test images of *all* instances, so the other instances are the negatives.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def compute_instance_scores(
    train_embeddings: np.ndarray, train_labels: np.ndarray, test_embeddings: np.ndarray, instance: str
) -> np.ndarray:
    """(N,) max cosine of each test embedding (N, D) to the instance's train embeddings (rows of (M, D))."""
    train_labels = np.asarray(train_labels)
    reference = _normalize(np.asarray(train_embeddings)[train_labels == instance])
    if len(reference) == 0:
        raise ValueError(f"instance {instance!r} has no train embeddings; its real_train images are missing")
    return (_normalize(test_embeddings) @ reference.T).max(axis=1)


def _targets(test_labels: np.ndarray, instance: str) -> np.ndarray:
    targets = np.asarray(test_labels) == instance
    if not targets.any():
        raise ValueError(f"instance {instance!r} has no test images; PR-AUC is undefined without positives")
    return targets


def evaluate_classification(
    train_embeddings: np.ndarray,
    train_labels: np.ndarray,
    test_embeddings: np.ndarray,
    test_labels: np.ndarray,
    instance: str,
) -> dict[str, float]:
    """``{"pr_auc": AP}`` of the instance's test images among all test images, ranked by max cosine."""
    scores = compute_instance_scores(train_embeddings, train_labels, test_embeddings, instance)
    return {"pr_auc": float(average_precision_score(_targets(test_labels, instance), scores))}


def compute_pr_curve(
    train_embeddings: np.ndarray,
    train_labels: np.ndarray,
    test_embeddings: np.ndarray,
    test_labels: np.ndarray,
    instance: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) arrays of the same ranking, for plotting in the report."""
    scores = compute_instance_scores(train_embeddings, train_labels, test_embeddings, instance)
    precision, recall, _thresholds = precision_recall_curve(_targets(test_labels, instance), scores)
    return precision, recall
