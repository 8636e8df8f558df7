"""COCO AP for the dense predictions of one instance, via pycocotools (``bbox`` and ``segm``).

The evaluation set is every dense-evaluation image (of all instances). Ground truth holds one category and one
object per image of the evaluated instance (its mask, and the mask's extent as the box); images of other
instances are in the set with no ground truth, so any prediction there is a false positive. Reported per task:
``ap`` = AP@[.50:.95] (``COCOeval.stats[0]``) and ``ap50`` = AP@.50 (``stats[1]``).

Edge cases: an instance with no ground truth at all gives NaN (AP is undefined; the averages skip NaN); ground
truth but no prediction gives 0.0 (pycocotools cannot load an empty result list).

Two entry points, one computation: :func:`evaluate_coco` takes dense (H, W) masks; :func:`evaluate_coco_compact`
takes the RLE forms an evaluation actor keeps instead (:func:`encode_annotation`, :func:`encode_prediction`), so
thousands of predictions never sit in memory as full-resolution masks. Both give the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from personalization.evaluation.dense import DensePrediction, mask_box

TASK_IOU_TYPES = {"detection": "bbox", "segmentation": "segm"}


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO RLE with ``counts`` as str (JSON-able)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_annotation(mask: np.ndarray) -> dict | None:
    """A ground-truth mask in the compact form an actor sends: ``{"rle", "area", "bbox"}``; None when empty
    (an empty annotation cannot be matched; its image stays in the set without ground truth)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    return {"rle": encode_rle(mask), "area": float(mask.sum()), "bbox": list(mask_box(mask))}


def encode_prediction(prediction: DensePrediction) -> dict:
    """A prediction without its dense mask: ``{"image_id", "box", "score", "rle"}`` (a few hundred bytes)."""
    return {
        "image_id": prediction.image_id,
        "box": [float(v) for v in prediction.box],
        "score": float(prediction.score),
        "rle": encode_rle(prediction.mask),
    }


def make_coco_ground_truth(images: Mapping[str, tuple[int, int]], gt_masks: Mapping[str, np.ndarray]) -> dict:
    """A COCO dataset dict: ``images`` = image_id -> (height, width) (all evaluated images), ``gt_masks`` = the
    instance's object mask per image that shows it (a subset of ``images``). Image ids become 1..N in key order.
    """
    for image_id, mask in gt_masks.items():
        if image_id in images and np.shape(mask) != tuple(images[image_id]):
            raise ValueError(f"mask of {image_id} is {np.shape(mask)}, the image is {tuple(images[image_id])}")
    return make_compact_ground_truth(images, {i: encode_annotation(m) for i, m in gt_masks.items()})


def make_compact_ground_truth(images: Mapping[str, tuple[int, int]], annotations: Mapping[str, dict | None]) -> dict:
    """:func:`make_coco_ground_truth` from :func:`encode_annotation` forms (None = an empty mask)."""
    ids = {image_id: number for number, image_id in enumerate(images, start=1)}
    unknown = sorted(set(annotations) - set(ids))
    if unknown:
        raise ValueError(f"ground-truth masks for images not in the evaluation set: {unknown[:3]}")
    found = []
    for image_id, annotation in annotations.items():
        if annotation is None:
            continue
        if tuple(annotation["rle"]["size"]) != tuple(images[image_id]):
            raise ValueError(f"mask of {image_id} is {tuple(annotation['rle']['size'])}, the image is "
                             f"{tuple(images[image_id])}")  # fmt: skip
        found.append(
            {
                "id": len(found) + 1,
                "image_id": ids[image_id],
                "category_id": 1,
                "segmentation": annotation["rle"],
                "area": annotation["area"],
                "bbox": list(annotation["bbox"]),
                "iscrowd": 0,
            }
        )
    return {
        "images": [{"id": ids[i], "height": int(h), "width": int(w)} for i, (h, w) in images.items()],
        "annotations": found,
        "categories": [{"id": 1, "name": "instance"}],
    }


def _results(predictions: Sequence[dict], ids: Mapping[str, int], iou_type: str) -> list[dict]:
    results = []
    for prediction in predictions:
        result = {"image_id": ids[prediction["image_id"]], "category_id": 1, "score": float(prediction["score"])}
        # loadRes treats any result holding "bbox" as a box result, so each task gets only its own field.
        if iou_type == "bbox":
            result["bbox"] = [float(v) for v in prediction["box"]]
        else:
            result["segmentation"] = dict(prediction["rle"])
        results.append(result)
    return results


def compute_coco_ap(
    ground_truth: dict, predictions: Sequence[dict], ids: Mapping[str, int], iou_type: str
) -> dict[str, float]:
    """``{"ap", "ap50"}`` of :func:`encode_prediction` forms against a ground-truth dict for one iou type."""
    if not ground_truth["annotations"]:
        return {"ap": math.nan, "ap50": math.nan}
    if not predictions:
        return {"ap": 0.0, "ap50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        coco_gt = COCO()
        coco_gt.dataset = ground_truth
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(_results(predictions, ids, iou_type))
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # -1 in stats means "no ground truth at this setting"; ground truth exists here, so it does not occur.
    return {"ap": float(evaluator.stats[0]), "ap50": float(evaluator.stats[1])}


def evaluate_coco(
    images: Mapping[str, tuple[int, int]],
    gt_masks: Mapping[str, np.ndarray],
    predictions: Sequence[DensePrediction],
    tasks: Sequence[str] = ("detection", "segmentation"),
) -> dict[str, float]:
    """``{"detection/ap", "detection/ap50", "segmentation/ap", "segmentation/ap50"}`` (for the given tasks).

    ``images``: image_id -> (height, width) of every evaluated image; ``gt_masks``: the instance's masks;
    ``predictions``: at most what the predictor found, on any of ``images``.
    """
    ground_truth = make_coco_ground_truth(images, gt_masks)
    return _evaluate(images, ground_truth, [encode_prediction(p) for p in predictions], tasks)


def evaluate_coco_compact(
    images: Mapping[str, tuple[int, int]],
    annotations: Mapping[str, dict | None],
    predictions: Sequence[dict],
    tasks: Sequence[str] = ("detection", "segmentation"),
) -> dict[str, float]:
    """:func:`evaluate_coco` from RLE forms (:func:`encode_annotation`, :func:`encode_prediction`): the same
    numbers, without a dense mask in memory (what an evaluation actor holds for thousands of predictions)."""
    return _evaluate(images, make_compact_ground_truth(images, annotations), predictions, tasks)


def _evaluate(
    images: Mapping[str, tuple[int, int]], ground_truth: dict, predictions: Sequence[dict], tasks: Sequence[str]
) -> dict[str, float]:
    ids = {image_id: number for number, image_id in enumerate(images, start=1)}
    missing = sorted({p["image_id"] for p in predictions} - set(ids))
    if missing:
        raise ValueError(f"predictions for images not in the evaluation set: {missing[:3]}")
    metrics = {}
    for task in tasks:
        if task not in TASK_IOU_TYPES:
            raise ValueError(f"task {task!r} is not one of {tuple(TASK_IOU_TYPES)}")
        for name, value in compute_coco_ap(ground_truth, predictions, ids, TASK_IOU_TYPES[task]).items():
            metrics[f"{task}/{name}"] = value
    return metrics
