import numpy as np
import pytest

from personalization.evaluation.dense import (
    box_cells,
    compute_instance_templates,
    compute_reference_vector,
    downsample_mask,
    mask_box,
    predict_instance,
    segment_similarity,
)

GRID, SIZE, CHANNELS = 16, 64, 8


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_features(rng, object_cells, reference):
    """(GRID, GRID, C) unit noise; the object cells carry the reference feature (plus a little noise)."""
    features = unit(rng.normal(size=(GRID, GRID, CHANNELS)))
    features[object_cells] = unit(reference + 0.05 * rng.normal(size=(int(object_cells.sum()), CHANNELS)))
    return features


def pixel_mask(r0, r1, c0, c1):
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def test_downsample_mask_area_rule_and_centroid_fallback():
    cells = downsample_mask(pixel_mask(8, 24, 16, 32), (GRID, GRID))  # 4 px per cell
    expected = np.zeros((GRID, GRID), dtype=bool)
    expected[2:6, 4:8] = True
    np.testing.assert_array_equal(cells, expected)
    tiny = downsample_mask(pixel_mask(41, 42, 9, 10), (GRID, GRID))  # one pixel: under half of any cell
    assert tiny.sum() == 1 and tiny[10, 2]


def test_reference_vector_is_half_max_half_mean():
    features = np.zeros((2, 2, 3))
    features[0, 0] = [1, 0, 0]
    features[0, 1] = [0, 1, 0]
    features[1, :] = [0, 0, 1]
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :] = True  # top row of cells
    expected = unit(0.5 * np.array([1.0, 1.0, 0.0]) + 0.5 * np.array([0.5, 0.5, 0.0]))
    np.testing.assert_allclose(compute_reference_vector(features, mask), expected)


def test_box_cells_and_mask_box():
    mask = pixel_mask(8, 24, 16, 32)
    assert mask_box(mask) == (16.0, 8.0, 16.0, 16.0)
    cells = box_cells(mask_box(mask), (SIZE, SIZE), (GRID, GRID))
    assert cells[2:6, 4:8].all() and cells.sum() == 16


def test_predicted_mask_covers_the_object():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=CHANNELS)
    train_cells = np.zeros((GRID, GRID), dtype=bool)
    train_cells[4:10, 4:10] = True
    train = synthetic_features(rng, train_cells, reference)
    train_mask = np.kron(train_cells, np.ones((4, 4), dtype=bool))
    test_cells = np.zeros((GRID, GRID), dtype=bool)
    test_cells[8:14, 2:9] = True
    test = synthetic_features(rng, test_cells, reference)
    truth = np.kron(test_cells, np.ones((4, 4), dtype=bool))

    templates = compute_instance_templates([train], [train_mask])
    prediction = predict_instance("t", test, (SIZE, SIZE), *templates, min_object_pixels=20)
    assert prediction is not None
    iou = (prediction.mask & truth).sum() / (prediction.mask | truth).sum()
    assert iou > 0.8
    x, y, w, h = prediction.box
    assert abs(x - 8) <= 3 and abs(y - 32) <= 3 and abs(w - 28) <= 5 and abs(h - 24) <= 5
    assert prediction.score > 0.95  # box mean of the object cells ~ reference ~ train box mean

    # An unrelated image (no reference cells) gets a lower confidence than the true object.
    other = synthetic_features(rng, np.zeros((GRID, GRID), dtype=bool), reference)
    negative = predict_instance("n", other, (SIZE, SIZE), *templates, min_object_pixels=20)
    assert negative is None or negative.score < prediction.score


def test_constant_map_gives_no_detection():
    assert segment_similarity(np.zeros((SIZE, SIZE), dtype=np.float32)) is None
    flat = np.ones((GRID, GRID, CHANNELS)) / np.sqrt(CHANNELS)
    mask = pixel_mask(0, 16, 0, 16)
    assert predict_instance("c", flat, (SIZE, SIZE), *compute_instance_templates([flat], [mask])) is None


def test_small_objects_are_removed():
    similarity = np.zeros((SIZE, SIZE), dtype=np.float32)
    similarity[2:6, 2:6] = 1.0  # 16 px
    assert segment_similarity(similarity, min_object_pixels=100) is None
    assert segment_similarity(similarity, min_object_pixels=10).sum() >= 16


def test_empty_first_mask_fails_clearly():
    with pytest.raises(ValueError, match="mask is empty"):
        compute_reference_vector(np.ones((2, 2, 3)), np.zeros((4, 4), dtype=bool))


def test_confidence_is_max_over_train_box_means():
    from personalization.evaluation.dense import compute_confidence, compute_train_box_means

    a, b = np.zeros((2, 2, 2)), np.zeros((2, 2, 2))
    a[...] = [1.0, 0.0]
    b[...] = [0.0, 1.0]
    mask = np.ones((4, 4), dtype=bool)
    means = compute_train_box_means([a, b], [mask, mask])
    np.testing.assert_allclose(means, [[1.0, 0.0], [0.0, 1.0]])
    test = np.zeros((2, 2, 2))
    test[...] = unit(np.array([0.6, 0.8]))
    assert compute_confidence(test, (0.0, 0.0, 4.0, 4.0), (4, 4), means) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="every train mask is empty"):
        compute_train_box_means([a], [np.zeros((4, 4), dtype=bool)])
