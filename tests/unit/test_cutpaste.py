"""Cut-and-Paste library: mask alignment, the two scale conventions, opt-in extra augmentations, determinism,
backgrounds from a folder, and the background loaders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from personalization import schema
from personalization.synthesis.backgrounds import load_backgrounds, make_procedural_backgrounds
from personalization.synthesis.cutpaste import (
    BASE_FRACTION,
    compute_object_side,
    compute_pasted_size,
    make_composite,
    make_composites,
    paste_object,
)

RED, BLUE, GREY, GREEN = (220, 30, 30), (30, 30, 220), (128, 128, 128), (20, 160, 40)


def two_tone_object(height=60, width=90):
    """A grey photo holding a rectangle object, red on its left half and blue on its right half."""
    pixels = np.full((height, width, 3), GREY, np.uint8)
    mask = np.zeros((height, width), bool)
    mask[10:50, 20:80] = True  # object box: 60 wide, 40 high
    pixels[10:50, 20:50] = RED
    pixels[10:50, 50:80] = BLUE
    return Image.fromarray(pixels), mask


def plain(size, colour=GREEN):
    return Image.new("RGB", (size, size), colour)


def masked_rows(instance_id="mug_1", n=2):
    rows = []
    for i in range(n):
        image, mask = two_tone_object()
        rows.append(
            schema.make_row(
                image_id=f"{instance_id}-{i}",
                instance_id=instance_id,
                category="mug",
                role="real_train",
                source="real",
                split="train",
                instance_split="test",
                image=image,
                mask=mask,
            )
        )
    return rows


def test_pasted_mask_is_aligned_with_object_pixels():
    # A random-texture object whose longest side (60 px) is exactly its pasted size: 1.0 * 0.5 * 120 = 60,
    # so every pixel under the pasted mask must equal the photo's object pixel, shifted to the position.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    mask = np.zeros((60, 90), bool)
    mask[10:50, 20:80] = True
    mask[10:20, 20:30] = False  # a notch: the mask is not just its box
    composite, pasted = paste_object(
        Image.fromarray(pixels), mask, plain(120), scale=1.0, position=(7, 33), size=120, scale_of="canvas"
    )
    out = np.asarray(composite)
    assert composite.size == (120, 120) and pasted.shape == (120, 120) and pasted.dtype == bool
    expected = np.zeros((120, 120), bool)
    expected[33:73, 7:67] = mask[10:50, 20:80]
    assert np.array_equal(pasted, expected)
    shifted = np.zeros_like(out)
    shifted[33:73, 7:67] = pixels[10:50, 20:80]
    assert np.array_equal(out[pasted], shifted[pasted])
    # Beyond the 1-px feather ring the background is untouched.
    ring = np.zeros_like(pasted)
    ring[30:76, 4:70] = True
    assert np.all(out[~ring] == GREEN)


def test_resized_object_keeps_its_layout():
    image, mask = two_tone_object()
    composite, pasted = paste_object(image, mask, plain(128), scale=1.0, position=(10, 30), size=128, scale_of="canvas")
    pixels = np.asarray(composite).astype(int)
    # 60 x 40 box scaled to a 64 px longest side: 64 x round(40 * 64 / 60) = 64 x 43 at (10, 30).
    ys, xs = np.nonzero(pasted)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (10, 30, 74, 73)
    assert pasted.sum() == 64 * 43
    # Left half red, right half blue (away from the few seam columns that resampling blends).
    assert np.all(np.abs(pixels[32:71, 10:38] - RED) <= 2)
    assert np.all(np.abs(pixels[32:71, 46:74] - BLUE) <= 2)


def test_flip_mirrors_the_object():
    image, mask = two_tone_object()
    composite, pasted = paste_object(
        image, mask, plain(128), scale=1.0, position=(10, 30), flip=True, size=128, scale_of="canvas"
    )
    pixels = np.asarray(composite).astype(int)
    assert np.all(np.abs(pixels[50, 12:40] - BLUE) <= 2)
    assert np.all(np.abs(pixels[50, 44:72] - RED) <= 2)


@pytest.mark.parametrize("scale", [0.3, 0.7, 1.3])
@pytest.mark.parametrize("angle", [0.0, 12.0])
def test_canvas_scale_sets_the_longest_side(scale, angle):
    image, mask = two_tone_object()
    size = 100
    _, pasted = paste_object(
        image, mask, plain(size), scale=scale, position=np.random.default_rng(0), angle=angle, size=size,
        scale_of="canvas",
    )  # fmt: skip
    ys, xs = np.nonzero(pasted)
    longest = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert abs(longest - round(scale * BASE_FRACTION * size)) <= 1
    assert compute_object_side(5.0, size) == 95  # clamped so the object still fits in the canvas


def test_random_position_keeps_object_inside():
    image, mask = two_tone_object()
    rng = np.random.default_rng(3)
    for _ in range(20):
        _, pasted = paste_object(image, mask, plain(64), scale=1.3, position=rng, size=64, scale_of="canvas")
        assert pasted.sum() == compute_object_side(1.3, 64) * round(40 * compute_object_side(1.3, 64) / 60)


def test_bad_masks_fail_clearly():
    image, mask = two_tone_object()
    with pytest.raises(ValueError, match="empty"):
        paste_object(image, np.zeros_like(mask), plain(64), scale=1.0, position=(0, 0), size=64)
    with pytest.raises(ValueError, match="must match"):
        paste_object(image, mask[:10], plain(64), scale=1.0, position=(0, 0), size=64)


def test_composites_are_deterministic_and_reproducible_alone():
    backgrounds = make_procedural_backgrounds(4, 64, seed=1)
    rows = masked_rows("mug_1") + masked_rows("mug_2")
    first = make_composites(rows, backgrounds, n=5, seed=7, scale_range=(0.3, 1.3), size=64)
    again = make_composites(rows, backgrounds, n=5, seed=7, scale_range=(0.3, 1.3), size=64)
    assert len(first) == 10 and [r["image_id"] for r in first] == [r["image_id"] for r in again]
    assert [r["image"] for r in first] == [r["image"] for r in again]
    assert len({r["image_id"] for r in first}) == 10
    assert len({r["image"] for r in first}) == 10  # different k (and instance) differ
    alone = make_composite(masked_rows("mug_2"), backgrounds, k=3, seed=7, scale_range=(0.3, 1.3), size=64)
    assert alone == first[5 + 3]
    other = make_composites(rows, backgrounds, n=5, seed=8, scale_range=(0.3, 1.3), size=64)
    assert {r["image_id"] for r in other}.isdisjoint(r["image_id"] for r in first)


def test_composite_rows_follow_the_schema():
    backgrounds = make_procedural_backgrounds(2, 48, seed=0)
    rows = make_composites(masked_rows(), backgrounds, n=3, seed=0, scale_range=(0.5, 0.5), size=48)
    table = schema.rows_to_table(rows)
    assert schema.validate_table(table).num_rows == 3
    for row in rows:
        assert (row["role"], row["source"], row["generator"], row["split"]) == ("positive", "cutpaste", "cutpaste", "")
        assert row["instance_split"] == "test" and row["category"] == "mug" and isinstance(row["seed"], int)
        mask = schema.decode_mask(row["mask"])
        assert mask.shape == (48, 48) == schema.decode_image(row["image"]).size[::-1] and mask.any()


def test_maskless_instance_is_rejected():
    rows = masked_rows()
    for row in rows:
        row["mask"] = None
    with pytest.raises(ValueError, match="mask"):
        make_composites(rows, make_procedural_backgrounds(1, 32, 0), n=1, seed=0, scale_range=(1, 1), size=32)


def test_procedural_backgrounds_are_seeded_and_varied():
    a = make_procedural_backgrounds(6, 48, seed=3)
    b = make_procedural_backgrounds(6, 48, seed=3)
    c = make_procedural_backgrounds(6, 48, seed=4)
    arrays = [np.asarray(im) for im in a]
    assert all(im.size == (48, 48) and im.mode == "RGB" for im in a)
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays, b, strict=True))
    assert not any(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays, c, strict=True))
    assert len({x.tobytes() for x in arrays}) == 6 and all(x.std() > 1 for x in arrays)
    with pytest.raises(ValueError):
        make_procedural_backgrounds(0, 48, seed=0)


def test_load_backgrounds_reads_folders_recursively(tmp_path):
    (tmp_path / "kitchen").mkdir()
    Image.new("RGB", (40, 30), RED).save(tmp_path / "kitchen" / "a.jpg")
    Image.new("L", (300, 100), 80).save(tmp_path / "b.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    images = load_backgrounds(tmp_path, max_side=150)
    assert [im.size for im in images] == [(150, 50), (40, 30)]  # sorted by path: b.PNG, kitchen/a.jpg
    assert all(im.mode == "RGB" for im in images)


def test_load_backgrounds_errors_name_the_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_backgrounds(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_backgrounds(tmp_path / "nowhere")


def test_object_scale_multiplies_the_objects_own_area():
    """Oracle: pasted sides = scale x the object's sides, with the photo's shorter side fitted to the canvas."""
    image = Image.new("RGB", (100, 80), GREY)
    mask = np.zeros((80, 100), bool)
    mask[30:50, 40:70] = True  # a 30 x 20 object
    for canvas in (80, 160):
        for scale in (0.3, 0.75, 1.0, 1.3):
            _, pasted = paste_object(image, mask, plain(canvas), scale=scale, position=(0, 0), size=canvas)
            factor = scale * canvas / 80
            assert pasted.sum() == round(30 * factor) * round(20 * factor)
    # Too large for the canvas: shrunk until its longest side is MAX_FRACTION of the canvas.
    assert compute_pasted_size((60, 40), (90, 60), 3.0, 120, "object") == (114, 76)
    with pytest.raises(ValueError, match="scale_of"):
        compute_pasted_size((60, 40), (90, 60), 1.0, 120, "photo")


@pytest.mark.parametrize("photo_side", [100, 160])
def test_composites_scale_the_object_between_0_3_and_1_3_at_random_places(photo_side):
    """Over many composites (the paper's recipe, the defaults): area ratio within [0.3**2, 1.3**2] and spread over
    that range; the object lands at many different places."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(photo_side, photo_side, 3), dtype=np.uint8)
    mask = np.zeros((photo_side, photo_side), bool)
    mask[photo_side // 5 : photo_side // 2, photo_side // 4 : photo_side * 3 // 4] = True
    row = masked_rows(n=1)[0] | {"image": schema.encode_png(Image.fromarray(pixels)), "mask": schema.encode_mask(mask)}
    size = 100
    original = mask.sum() * (size / photo_side) ** 2  # the object's area with the photo fitted to the canvas
    ratios, corners = [], set()
    for k in range(60):
        out = make_composite([row], [plain(size)], k=k, seed=0, scale_range=(0.3, 1.3), size=size)
        pasted = schema.decode_mask(out["mask"])
        ratios.append(pasted.sum() / original)
        ys, xs = np.nonzero(pasted)
        corners.add((xs.min(), ys.min()))
    slack = 0.04  # rounding each side to whole pixels
    assert 0.3**2 - slack <= min(ratios) and max(ratios) <= 1.3**2 + slack
    assert min(ratios) < 0.2 and max(ratios) > 1.3  # the draws use the range, not one size
    assert len(corners) >= 50


def _left_colour(composite: Image.Image, pasted: np.ndarray) -> np.ndarray:
    """The colour in the middle of the pasted object's left quarter."""
    ys, xs = np.nonzero(pasted)
    return np.asarray(composite).astype(int)[(ys.min() + ys.max()) // 2, xs.min() + (xs.max() - xs.min()) // 4]


def test_extra_augmentations_are_opt_in():
    rows = masked_rows(n=1)
    kwargs = dict(seed=0, scale_range=(0.8, 1.2), size=96)
    plain_rows = [make_composite(rows, [plain(96)], k=k, **kwargs) for k in range(12)]
    for out in plain_rows:  # no flip, rotation or jitter: an upright rectangle, exactly red on its left
        image, pasted = schema.decode_image(out["image"]), schema.decode_mask(out["mask"])
        ys, xs = np.nonzero(pasted)
        assert pasted.sum() == (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        assert np.abs(_left_colour(image, pasted) - RED).max() <= 1
    extra = [make_composite(rows, [plain(96)], k=k, extra_augment=True, **kwargs) for k in range(12)]
    decoded = [(schema.decode_image(r["image"]), schema.decode_mask(r["mask"])) for r in extra]
    lefts = [_left_colour(image, pasted) for image, pasted in decoded]
    assert any(np.abs(c - BLUE).sum() < np.abs(c - RED).sum() for c in lefts)  # some flipped
    assert any(3 < np.abs(c - RED).max() < 60 for c in lefts)  # some jittered
    boxes = [(np.ptp(np.nonzero(m)[1]) + 1) * (np.ptp(np.nonzero(m)[0]) + 1) for _, m in decoded]
    assert any(m.sum() < 0.95 * box for (_, m), box in zip(decoded, boxes, strict=True))  # some rotated
    assert {r["image_id"] for r in extra}.isdisjoint(r["image_id"] for r in plain_rows)


def test_backgrounds_come_from_the_configured_folder(tmp_path):
    """cutpaste.backgrounds_dir -> the stage's background set -> composites whose pixels away from the object are
    exactly one of the folder's photos."""
    from personalization.config import build_config
    from personalization.synthesis.cutpaste import composite_options
    from pipelines.cutpaste import _encoded_backgrounds

    colours = [(250, 200, 10), (10, 200, 250)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (160, 120), colour).save(tmp_path / f"scene_{i}.jpg" if i else tmp_path / f"scene_{i}.png")
    cfg = build_config({"cutpaste": {"backgrounds_dir": str(tmp_path), "image_size": 64}})
    blobs, key = _encoded_backgrounds(cfg)
    assert len(blobs) == 2 and key == f"folder:{tmp_path.resolve()}"
    backgrounds = [schema.decode_image(b) for b in blobs]
    used = set()
    for k in range(10):
        out = make_composite(
            masked_rows(n=1), backgrounds, k=k, seed=0, backgrounds_key=key, **composite_options(cfg.cutpaste)
        )
        pixels, pasted = np.asarray(schema.decode_image(out["image"])).astype(int), schema.decode_mask(out["mask"])
        away = ~np.asarray(Image.fromarray(pasted).filter(ImageFilter.MaxFilter(5)))  # beyond the 1-px feather
        seen = {tuple(c) for c in pixels[away]}
        match = [c for c in colours if all(np.abs(np.array(s) - c).max() <= 3 for s in seen)]  # JPEG: near
        assert len(match) == 1
        used.add(match[0])
    assert used == set(colours)


def test_cutpaste_defaults_are_the_papers_and_the_demo_keeps_its_recipe():
    from personalization.config import CutpasteConfig, load_config

    default = CutpasteConfig()
    assert (default.scale_of, default.extra_augment, default.scale_min, default.scale_max) == (
        "object",
        False,
        0.3,
        1.3,
    )
    demo = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").cutpaste
    assert (demo.scale_of, demo.extra_augment) == ("canvas", True)
