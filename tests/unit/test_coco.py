import math

import numpy as np
import pytest

from personalization.evaluation.coco import evaluate_coco
from personalization.evaluation.dense import DensePrediction, mask_box

HW = (100, 100)


def box_mask(x, y, w, h):
    mask = np.zeros(HW, dtype=bool)
    mask[y : y + h, x : x + w] = True
    return mask


def prediction(image_id, mask, score=0.9):
    return DensePrediction(image_id=image_id, mask=mask, box=mask_box(mask), score=score)


@pytest.fixture
def scene():
    images = {"own_1": HW, "own_2": HW, "other_1": HW}
    gt = {"own_1": box_mask(10, 10, 40, 40), "own_2": box_mask(30, 20, 50, 30)}
    return images, gt


def test_perfect_predictions_score_one(scene):
    images, gt = scene
    metrics = evaluate_coco(images, gt, [prediction(k, m) for k, m in gt.items()])
    assert metrics == pytest.approx(
        {"detection/ap": 1.0, "detection/ap50": 1.0, "segmentation/ap": 1.0, "segmentation/ap50": 1.0}
    )


def test_iou_0_6_passes_ap50_but_not_ap(scene):
    images, gt = scene
    # GT 40x40 at (10, 10); prediction 40x25 inside it: IoU = 1000 / 1600 = 0.625 for box and mask alike.
    shifted = box_mask(10, 10, 40, 25)
    predictions = [prediction("own_1", shifted, score=0.8), prediction("own_2", gt["own_2"], score=0.9)]
    metrics = evaluate_coco(images, gt, predictions)
    for task in ("detection", "segmentation"):
        assert metrics[f"{task}/ap50"] == pytest.approx(1.0)
        assert metrics[f"{task}/ap"] < 1.0
        # own_2 (ranked first) is perfect; own_1 matches at IoU thresholds .50, .55, .60 only. At the other 7,
        # recall stops at 1/2 with precision 1 -> 51 of COCO's 101 recall points.
        assert metrics[f"{task}/ap"] == pytest.approx((3 * 1.0 + 7 * 51 / 101) / 10, abs=1e-6)


def test_confident_false_positive_on_another_instance_lowers_ap(scene):
    images, gt = scene
    clean = [prediction(k, m, score=0.5) for k, m in gt.items()]
    false_positive = prediction("other_1", box_mask(0, 0, 30, 30), score=0.99)
    metrics = evaluate_coco(images, gt, clean + [false_positive])
    # Ranking FP, TP, TP: precision at recall 1/2 is 1/2 and at 1 is 2/3, interpolated -> 2/3 everywhere.
    for task in ("detection", "segmentation"):
        assert metrics[f"{task}/ap"] == pytest.approx(2 / 3, abs=1e-6)
    # The same FP with a low score costs nothing.
    low = prediction("other_1", box_mask(0, 0, 30, 30), score=0.1)
    assert evaluate_coco(images, gt, clean + [low])["detection/ap"] == pytest.approx(1.0)


def test_no_ground_truth_is_nan_and_no_prediction_is_zero(scene):
    images, gt = scene
    nan = evaluate_coco(images, {}, [prediction("other_1", box_mask(0, 0, 30, 30))], tasks=("detection",))
    assert set(nan) == {"detection/ap", "detection/ap50"} and math.isnan(nan["detection/ap"])
    assert evaluate_coco(images, gt, []) == pytest.approx(
        {k: 0.0 for k in nan} | {"segmentation/ap": 0.0, "segmentation/ap50": 0.0}
    )


def test_bad_inputs_fail_clearly(scene):
    images, gt = scene
    with pytest.raises(ValueError, match="not in the evaluation set"):
        evaluate_coco(images, gt, [prediction("nowhere", gt["own_1"])])
    with pytest.raises(ValueError, match="is not one of"):
        evaluate_coco(images, gt, [], tasks=("keypoints",))
