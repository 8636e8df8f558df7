import math

import numpy as np
import pytest

from personalization.evaluation.retrieval import compute_ranking_metrics, evaluate_retrieval


def naive_query_metrics(query, gallery, relevant):
    sims = [float(query @ g / np.linalg.norm(query) / np.linalg.norm(g)) for g in gallery]
    order = sorted(range(len(gallery)), key=lambda i: -sims[i])
    dcg = sum(1 / math.log2(rank + 1) for rank, i in enumerate(order, start=1) if relevant[i])
    idcg = sum(1 / math.log2(rank + 1) for rank in range(1, sum(relevant) + 1))
    first = next(rank for rank, i in enumerate(order, start=1) if relevant[i])
    return dcg / idcg, 1 / first, float(first <= 10)


def test_hand_computed_example():
    # Gallery of 4 ranked by similarity to the query; relevant at ranks 1 and 3.
    similarity = np.array([[0.9, 0.8, 0.7, 0.6]])
    relevant = np.array([True, False, True, False])
    metrics = compute_ranking_metrics(similarity, relevant)
    assert metrics["ndcg"][0] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert metrics["mrr"][0] == 1.0
    assert metrics["top10"][0] == 1.0
    # Relevant at ranks 2 and 4 of 4: MRR 1/2.
    metrics = compute_ranking_metrics(similarity, np.array([False, True, False, True]))
    assert metrics["ndcg"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    assert metrics["mrr"][0] == 0.5


def test_top10_misses_when_first_relevant_is_eleventh():
    similarity = -np.arange(12, dtype=float)[None, :]
    relevant = np.zeros(12, dtype=bool)
    relevant[10] = True
    metrics = compute_ranking_metrics(similarity, relevant)
    assert metrics["top10"][0] == 0.0
    assert metrics["mrr"][0] == pytest.approx(1 / 11)
    assert metrics["ndcg"][0] == pytest.approx(1 / math.log2(12))


def test_matches_naive_loop():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(15, 8))
    gallery_labels = np.array(list("aaabbbcccdddeee"))
    queries = rng.normal(size=(20, 8))
    query_labels = np.array(list("abcde") * 4)
    for instance in "abcde":
        relevant = gallery_labels == instance
        per_query = [naive_query_metrics(q, gallery, relevant) for q in queries[query_labels == instance]]
        expected = np.mean(per_query, axis=0)
        result = evaluate_retrieval(gallery, gallery_labels, queries, query_labels, instance)
        assert result == pytest.approx({"ndcg": expected[0], "mrr": expected[1], "top10": expected[2]})


def test_perfect_retrieval_is_one():
    gallery = np.eye(4)
    labels = np.array(["a", "a", "b", "b"])
    queries = np.array([[1.0, 1.0, 0.0, 0.0]])
    result = evaluate_retrieval(gallery, labels, queries, np.array(["a"]), "a")
    assert result == pytest.approx({"ndcg": 1.0, "mrr": 1.0, "top10": 1.0})
