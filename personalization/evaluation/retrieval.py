"""Personalized retrieval: the instance's test images query the gallery of all instances' train images.

For each query q (an L2-normalized embedding of a test image of ``instance``), the gallery (G, D) is ranked by
cosine, descending. With binary relevance ``rel_r`` (gallery item at 1-based rank r belongs to the instance) and
R relevant items in the gallery:

- ``DCG = sum_r rel_r / log2(r + 1)`` over the full ranking; ``IDCG = sum_{r=1..R} 1 / log2(r + 1)``;
  ``NDCG = DCG / IDCG``;
- ``MRR = 1 / r*`` with r* the rank of the first relevant item;
- ``top10 = 1`` when a relevant item is within the first 10 ranks.

Each is averaged over the instance's queries. Ties in similarity are broken by gallery order (stable sort).
"""

from __future__ import annotations

import numpy as np

from personalization.evaluation.classification import _normalize


def compute_ranking_metrics(similarity: np.ndarray, relevant: np.ndarray, top_k: int = 10) -> dict[str, np.ndarray]:
    """Per-query metrics from a (Q, G) similarity matrix and a (G,) boolean relevance vector.

    Returns ``{"ndcg": (Q,), "mrr": (Q,), "top10": (Q,)}`` (the last key is named for ``top_k`` = 10).
    """
    relevant = np.asarray(relevant, dtype=bool)
    n_relevant = int(relevant.sum())
    if n_relevant == 0:
        raise ValueError("the gallery holds no relevant item; ranking metrics are undefined")
    order = np.argsort(-similarity, axis=1, kind="stable")  # (Q, G) gallery indices, best first
    hits = relevant[order]  # (Q, G) relevance at each rank
    discount = 1.0 / np.log2(np.arange(2, similarity.shape[1] + 2))  # rank r (1-based) -> 1 / log2(r + 1)
    dcg = (hits * discount).sum(axis=1)
    idcg = discount[:n_relevant].sum()
    first = hits.argmax(axis=1)  # 0-based rank of the first relevant item (exists: n_relevant > 0)
    return {
        "ndcg": dcg / idcg,
        "mrr": 1.0 / (first + 1),
        f"top{top_k}": hits[:, :top_k].any(axis=1).astype(np.float64),
    }


def evaluate_retrieval(
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    query_embeddings: np.ndarray,
    query_labels: np.ndarray,
    instance: str,
) -> dict[str, float]:
    """``{"ndcg", "mrr", "top10"}`` averaged over the queries whose label is ``instance``."""
    query_labels = np.asarray(query_labels)
    queries = _normalize(np.asarray(query_embeddings)[query_labels == instance])
    if len(queries) == 0:
        raise ValueError(f"instance {instance!r} has no query (test) images")
    similarity = queries @ _normalize(gallery_embeddings).T
    per_query = compute_ranking_metrics(similarity, np.asarray(gallery_labels) == instance)
    return {name: float(values.mean()) for name, values in per_query.items()}
