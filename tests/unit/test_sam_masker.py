"""The filter's PerSAM-style masker on the zoo's tiny random SAM (a real ``SamModel`` loaded with from_pretrained),
and the filter's default masker: SAM where SAM weights are configured, the patch shortcut as a logged fallback."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from personalization.config import FilterConfig
from personalization.errors import UserError
from personalization.filtering import PatchMasker, SamMasker, Scorer, build_masker
from personalization.schema import encode_png, make_row, write_image_table
from personalization.zoo.dreamsim import DREAMSIM_TYPE


class ColorCells:
    """A transparent embedder: each image resized to 64 px, patch feature = mean colour of each 8x8 cell, centred
    and L2-normalized (an 8x8 grid, as DreamSim's is 7x7 at any image size)."""

    device = torch.device("cpu")

    def patch_features(self, images):
        pixels = [np.asarray(im.resize((64, 64)), np.float32) for im in images]
        cells = [F.avg_pool2d(torch.from_numpy(p).permute(2, 0, 1)[None], 8)[0] for p in pixels]
        return F.normalize(torch.stack(cells).permute(0, 2, 3, 1) - 127.5, dim=-1)


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return tiny_zoo(["sam", "dreamsim"])


def red_square(size=64, box=(8, 8, 32, 32), seed=0):
    """A red square on a blue background (with a little noise), and its mask."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 2] = 200
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (220, 20, 20)
    pixels = np.clip(pixels.astype(int) + rng.integers(-5, 6, pixels.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return Image.fromarray(pixels), mask


def test_zoo_sam_has_the_hub_layout(zoo):
    files = {p.name for p in zoo["sam"].iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files


def test_sam_masker_prompts_persam_points_and_returns_image_sized_masks(zoo):
    real, mask = red_square()
    masker = build_masker("sam", ColorCells(), str(zoo["sam"]), device="cpu")
    assert isinstance(masker, SamMasker) and type(masker.model).__name__ == "SamModel"
    masker.fit([real], [mask])
    # Generated images of other sizes, the object moved: the positive point lies on it, the negative one off it.
    images = [red_square(64, (32, 24, 56, 48), seed=1)[0], red_square(96, (8, 48, 40, 88), seed=2)[0].resize((96, 80))]
    (pos, neg), _ = masker._points(images)
    assert 32 <= pos[0] < 56 and 24 <= pos[1] < 48 and not (32 <= neg[0] < 56 and 24 <= neg[1] < 48)
    masks = masker.masks(images)
    assert [m.shape for m in masks] == [(64, 64), (80, 96)] and all(m.dtype == np.bool_ for m in masks)
    boxes = masker.boxes(images)
    for (x0, y0, x1, y1), image in zip(boxes, images, strict=True):
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    assert masker.masks([]) == []


def test_sam_weights_that_are_not_a_checkpoint_fail_naming_the_key(tmp_path):
    with pytest.raises(UserError, match="filter.sam_weights"):
        build_masker("sam", ColorCells(), str(tmp_path), device="cpu")


def test_default_masker_is_sam_where_weights_are_configured(zoo, tmp_path, caplog):
    assert FilterConfig().masker == "auto"
    rows = []
    for k in range(2):
        image, mask = red_square(seed=k)
        rows.append(make_row(image_id=f"r{k}", instance_id="mug_1", category="mug", role="real_train",
                             source="real", split="train", image=image, mask=mask))  # fmt: skip
    write_image_table(rows, tmp_path / "real.parquet")
    common = dict(dreamsim_type=DREAMSIM_TYPE, device="cpu")
    with caplog.at_level(logging.WARNING, logger="personalization.filtering.maskers"):
        scorer = Scorer(str(tmp_path / "real.parquet"), str(zoo["dreamsim"]), sam_weights=str(zoo["sam"]), **common)
    assert isinstance(scorer.masker, SamMasker) and not caplog.records
    # The path generate and filter run: decode, fit on the real photos, SAM boxes, DreamSim on the crops.
    batch = {
        "instance_id": np.array(["mug_1", "mug_1"], dtype=object),
        "image": np.array([encode_png(red_square(64, (24, 24, 48, 48), seed=5)[0])] * 2, dtype=object),
    }
    scores = scorer(batch)["score"]
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in scores) and scores[0] == scores[1]

    # Without SAM weights (what Scorer(masker="auto") builds): the patch shortcut, announced as the fallback.
    with caplog.at_level(logging.WARNING, logger="personalization.filtering.maskers"):
        fallback = build_masker("auto", scorer.embedder, "")
    assert type(fallback) is PatchMasker
    assert any("fallback masker=patch" in r.getMessage() and "filter.sam_weights" in r.getMessage()
               for r in caplog.records)  # fmt: skip
