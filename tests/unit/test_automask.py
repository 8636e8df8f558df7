"""GrabCut mask derivation against known masks: a synthetic object on texture, and a real photo (hand-annotated)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from personalization.datasets.automask import center_box, compute_iou, load_boxes, segment_object
from personalization.errors import UserError


def _ellipse(height, width, cx, cy, ax, ay):
    yy, xx = np.mgrid[:height, :width]
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1


def _textured_scene(cx=170, cy=115):
    """A striped orange ellipse on a noisy blocky background (240 x 320) and its true mask."""
    rng = np.random.default_rng(0)
    height, width = 240, 320
    blocks = rng.integers(60, 200, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    background = np.clip(blocks + rng.normal(0, 12, blocks.shape), 0, 255)
    yy, xx = np.mgrid[:height, :width]
    texture = np.stack([200 + 30 * np.sin(xx / 5.0), 60 + 20 * np.cos(yy / 7.0), 40 + 0 * xx], -1)
    truth = _ellipse(height, width, cx, cy, 70, 55)
    return Image.fromarray(np.where(truth[..., None], texture, background).astype(np.uint8)), truth


def test_central_box_recovers_a_synthetic_object():
    image, truth = _textured_scene()
    derived = segment_object(image)
    assert derived.box_from == "center" and not derived.fallback
    assert derived.mask.shape == truth.shape
    assert compute_iou(derived.mask, truth) > 0.95


def test_user_box_finds_an_object_off_centre():
    image, truth = _textured_scene(cx=85, cy=70)  # the central box would cut it
    derived = segment_object(image, (5, 5, 165, 135))
    assert derived.box_from == "boxes.json"
    assert compute_iou(derived.mask, truth) > 0.95
    assert compute_iou(segment_object(image).mask, truth) < compute_iou(derived.mask, truth)


def test_real_photo_against_a_hand_annotation():
    """scikit-image's coffee photo (400 x 600): cup, spoon and saucer annotated by hand as two ellipses and a
    rectangle (checked by eye against an overlay)."""
    photo = data.coffee()
    height, width = photo.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    truth = _ellipse(height, width, 278, 230, 200, 155) | _ellipse(height, width, 291, 105, 118, 88)
    truth |= (xx >= 175) & (xx <= 410) & (yy >= 105) & (yy <= 280)
    assert compute_iou(segment_object(Image.fromarray(photo)).mask, truth) > 0.85
    assert compute_iou(segment_object(Image.fromarray(photo), (70, 8, 490, 392)).mask, truth) > 0.8


def test_a_flat_image_falls_back_to_the_box():
    derived = segment_object(Image.new("RGB", (100, 50), (128, 128, 128)))
    assert derived.fallback
    x0, y0, x1, y1 = (round(v) for v in center_box(100, 50))
    assert derived.mask.sum() == (x1 - x0) * (y1 - y0)


def test_same_photo_same_mask():
    image, _ = _textured_scene()
    assert np.array_equal(segment_object(image).mask, segment_object(image).mask)


def test_boxes_file(tmp_path):
    assert load_boxes(tmp_path) == {}
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [1, 2, 30, 40]}))
    assert load_boxes(tmp_path) == {"a": (1.0, 2.0, 30.0, 40.0)}
    (tmp_path / "boxes.json").write_text(json.dumps({"a": [30, 2, 1, 40]}))
    with pytest.raises(UserError, match=r"boxes.json\['a'\].*x0 < x1"):
        load_boxes(tmp_path)
    (tmp_path / "boxes.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_boxes(tmp_path)
