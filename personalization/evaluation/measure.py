"""One encoder's metrics for the instances it is scored on, computed where its features are (no Ray here).

:func:`evaluate_encoder` is the whole evaluation of one encoder: the dense templates of its instances (their
masked train images), then one streamed pass over the evaluation images (:mod:`.images`) embedding the train and
test images and predicting on the dense ones, then the metrics. It returns per instance a compact, JSON-able
result: ``metrics`` (``classification/pr_auc``, ``retrieval/{ndcg,mrr,top10}``, ``detection/{ap,ap50}``,
``segmentation/{ap,ap50}`` for the tasks asked), ``split_metrics`` (``{test split: {classification and
retrieval keys}}``, :func:`compute_split_metrics`; empty without PODS test splits), ``curve`` (``{"precision",
"recall"}`` lists, or None without classification), ``predictions`` (``[{"image_id", "box", "score"}]``) and
``example`` (the best prediction on one of the instance's own images: ``{"image_id", "score", "rle", "image"
(its PNG bytes)}``, or None). Dense masks become COCO RLE as they are predicted, so the process holds embeddings
(N x D floats) and RLEs, never a batch of full-size masks beyond the one being predicted.

The embedding tasks and the dense tasks share no computation, so one encoder's evaluation can run as two parts
(:func:`split_tasks`), in two processes at once; :func:`merge_results` puts their results together into exactly
what one call with every task returns.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from personalization import schema
from personalization.evaluation.classification import compute_pr_curve, evaluate_classification
from personalization.evaluation.coco import encode_annotation, encode_prediction, evaluate_coco_compact
from personalization.evaluation.extract import FeatureExtractor
from personalization.evaluation.images import EvaluationImages, iter_rows
from personalization.evaluation.retrieval import evaluate_retrieval

DENSE_TASKS = ("detection", "segmentation")
EMBED_TASKS = ("classification", "retrieval")
RETRIEVAL_NAMES = ("ndcg", "mrr", "top10")  # evaluate_retrieval's keys


def split_tasks(tasks: Sequence[str]) -> list[tuple[str, ...]]:
    """``tasks`` as independent parts, the embedding tasks first (the larger part: every train and test image),
    then the dense ones; empty parts left out (with no task asked, one empty part: every item still runs once)."""
    parts = [tuple(t for t in tasks if t in EMBED_TASKS), tuple(t for t in tasks if t in DENSE_TASKS)]
    return [part for part in parts if part] or [()]


def merge_results(parts: Sequence[dict]) -> dict:
    """One instance's result from its parts' results (:func:`evaluate_encoder` on each of :func:`split_tasks`, in
    that order): metrics in order, and each other field from the part that has it."""
    merged = {"metrics": {}, "curve": None, "split_metrics": {}, "predictions": [], "example": None}
    for part in parts:
        merged["metrics"].update(part["metrics"])
        for key in ("curve", "split_metrics", "predictions", "example"):
            merged[key] = part[key] or merged[key]
    return merged


def compute_templates(
    extractor: FeatureExtractor, images_path: str | Path, sets: EvaluationImages, instances: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{instance: (reference (C,), train box means (k, C))}, float64, from all its masked train images at once."""
    wanted = {instance: sets.masked_train(instance) for instance in instances}
    rows = {}
    for table in iter_rows(images_path, [i for ids in wanted.values() for i in ids], ["image", "mask"], 256):
        pairs = zip(table["image"].to_pylist(), table["mask"].to_pylist(), strict=True)
        rows.update(zip(table["image_id"].to_pylist(), pairs, strict=True))
    templates = {}
    for instance, ids in wanted.items():
        references, box_means = extractor.templates([rows[i][0] for i in ids], [rows[i][1] for i in ids])
        templates[instance] = (references[0].astype(np.float64), box_means.astype(np.float64))
    return templates


@dataclasses.dataclass(frozen=True)
class EvaluationInputs:
    """What one encoder is evaluated on: the evaluation images' Parquet folder and their sets, the instances
    scored, the tasks asked, and the reading settings (rows per streamed batch; the fewest pixels a predicted
    object keeps). ``streamed``: the tasks whose images the pass streams (default: ``tasks``); a part of the tasks
    streams those of all of them, so that its batches, and with them its floats, are those of the whole."""

    images_path: str | Path
    sets: EvaluationImages
    instances: Sequence[str]
    tasks: Sequence[str]
    batch_size: int
    min_object_pixels: int
    streamed: Sequence[str] = ()


def extract_features(
    extractor: FeatureExtractor, inputs: EvaluationInputs
) -> tuple[dict[str, np.ndarray], dict[str, list[dict]], dict[str, dict], dict[str, dict]]:
    """One streamed pass: embeddings {image_id: (D,)} of train + test images, RLE predictions {instance: [...]}
    on the dense images, the ground-truth annotations {image_id: RLE form or None} of the instances' own, and
    each instance's example (:func:`keep_if_best`)."""
    images_path, sets, instances, tasks = inputs.images_path, inputs.sets, inputs.instances, inputs.tasks
    embed = set(sets.train + sets.test) if set(EMBED_TASKS) & set(tasks) else set()
    dense = set(sets.dense) if set(DENSE_TASKS) & set(tasks) else set()
    streamed = set(inputs.streamed or tasks)
    stream = set(sets.train + sets.test) if set(EMBED_TASKS) & streamed else set()
    stream |= set(sets.dense) if set(DENSE_TASKS) & streamed else set()
    templates = compute_templates(extractor, images_path, sets, instances) if dense else {}
    embeddings: dict[str, np.ndarray] = {}
    predictions: dict[str, list[dict]] = {i: [] for i in instances}
    annotations: dict[str, dict | None] = {}
    examples: dict[str, dict] = {}
    for table in iter_rows(images_path, embed | dense | stream, ["image", "mask"], inputs.batch_size):
        ids, images = table["image_id"].to_pylist(), table["image"].to_pylist()
        chosen = [k for k, i in enumerate(ids) if i in embed]
        if chosen:
            found = extractor.embed([images[k] for k in chosen])
            embeddings.update(zip([ids[k] for k in chosen], found, strict=True))
        chosen = [k for k, i in enumerate(ids) if i in dense]
        if not chosen:
            continue
        hw = [sets.size[ids[k]] for k in chosen]
        for instance, prediction in extractor.predictions(
            [images[k] for k in chosen], [ids[k] for k in chosen], hw, templates, inputs.min_object_pixels
        ):
            predictions[instance].append(encode_prediction(prediction))
            keep_if_best(examples, instance, predictions[instance][-1], sets, images[ids.index(prediction.image_id)])
        for k, mask in zip(chosen, table["mask"].take(chosen).to_pylist(), strict=True):
            if sets.owner[ids[k]] in templates and mask is not None:
                annotations[ids[k]] = encode_annotation(schema.decode_mask(mask))
    return embeddings, predictions, annotations, examples


def keep_if_best(examples: dict[str, dict], instance: str, prediction: dict, sets: EvaluationImages, image: bytes):
    """Keep the first highest-scoring prediction on one of the instance's own images (the report's example), with
    the PNG of that image: ``{"image_id", "score", "rle", "image"}``."""
    if sets.owner.get(prediction["image_id"]) != instance:
        return
    if instance not in examples or prediction["score"] > examples[instance]["score"]:
        examples[instance] = {k: prediction[k] for k in ("image_id", "score", "rle")} | {"image": image}


def evaluate_encoder(extractor: FeatureExtractor, inputs: EvaluationInputs) -> dict[str, dict]:
    """{instance: {"metrics", "curve", "predictions", "example"}} of one encoder (see the module docstring)."""
    embeddings, predictions, annotations, examples = extract_features(extractor, inputs)
    sets, instances, tasks = inputs.sets, inputs.instances, inputs.tasks
    results = {}
    for instance in instances:
        metrics, curve = compute_embedding_metrics(embeddings, sets, instance, tasks)
        split_metrics = compute_split_metrics(embeddings, sets, instance, tasks)
        dense_tasks = [t for t in tasks if t in DENSE_TASKS]
        if dense_tasks:
            own = {i: annotations[i] for i in sets.dense if sets.owner[i] == instance and i in annotations}
            images = {i: sets.size[i] for i in sets.dense}
            # NaN when the instance has no annotated dense image (documented in evaluation/coco.py).
            metrics.update(evaluate_coco_compact(images, own, predictions[instance], tasks=dense_tasks))
        results[instance] = {
            "metrics": metrics,
            "curve": curve,
            "split_metrics": split_metrics,
            "predictions": [{k: p[k] for k in ("image_id", "box", "score")} for p in predictions[instance]],
            "example": examples.get(instance),
        }
    return results


def compute_embedding_metrics(
    embeddings: dict[str, np.ndarray], sets: EvaluationImages, instance: str, tasks: Sequence[str]
) -> tuple[dict[str, float], dict | None]:
    """Classification PR-AUC (and its curve) and retrieval NDCG / MRR / top-10 of one instance."""
    metrics: dict[str, float] = {}
    if not set(EMBED_TASKS) & set(tasks):
        return metrics, None
    train_x, train_y = _stack(embeddings, sets, sets.train)
    test_x, test_y = _stack(embeddings, sets, sets.test)
    curve = None
    if "classification" in tasks:
        metrics["classification/pr_auc"] = evaluate_classification(train_x, train_y, test_x, test_y, instance)["pr_auc"]
        precision, recall = compute_pr_curve(train_x, train_y, test_x, test_y, instance)
        curve = {"precision": precision.tolist(), "recall": recall.tolist()}
    if "retrieval" in tasks:
        for name, value in evaluate_retrieval(train_x, train_y, test_x, test_y, instance).items():
            metrics[f"retrieval/{name}"] = value
    return metrics, curve


def compute_split_metrics(
    embeddings: dict[str, np.ndarray], sets: EvaluationImages, instance: str, tasks: Sequence[str]
) -> dict[str, dict[str, float]]:
    """{test split: metrics} of one instance, the embedding metrics of :func:`compute_embedding_metrics` on the
    test set cut to one split (the test images of that split, of every instance; the gallery and the references
    stay all train images). NaN where the instance has no test image in a split. Empty without test splits."""
    if not set(EMBED_TASKS) & set(tasks):
        return {}
    found = {}
    for split in sets.test_splits():
        chosen = [i for i in sets.test if sets.split.get(i) == split]
        cut = dataclasses.replace(sets, test=chosen, dense=[])
        if any(sets.owner[i] == instance for i in chosen):
            found[split] = compute_embedding_metrics(embeddings, cut, instance, tasks)[0]
        else:
            keys = ["classification/pr_auc"] if "classification" in tasks else []
            keys += [f"retrieval/{name}" for name in RETRIEVAL_NAMES] if "retrieval" in tasks else []
            found[split] = dict.fromkeys(keys, math.nan)
    return found


def _stack(embeddings: dict[str, np.ndarray], sets: EvaluationImages, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) embeddings and (N,) owner labels of ``ids``."""
    return np.stack([embeddings[i] for i in ids]), np.array([sets.owner[i] for i in ids])
