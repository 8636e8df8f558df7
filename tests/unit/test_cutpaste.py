"""Cut-and-Paste library: mask alignment, scale, flips, determinism, and the background loaders."""

import numpy as np
import pytest
from PIL import Image

from personalization import schema
from personalization.synthesis.backgrounds import load_backgrounds, make_procedural_backgrounds
from personalization.synthesis.cutpaste import (
    BASE_FRACTION,
    compute_object_side,
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
    composite, pasted = paste_object(Image.fromarray(pixels), mask, plain(120), scale=1.0, position=(7, 33), size=120)
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
    composite, pasted = paste_object(image, mask, plain(128), scale=1.0, position=(10, 30), size=128)
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
    composite, pasted = paste_object(image, mask, plain(128), scale=1.0, position=(10, 30), flip=True, size=128)
    pixels = np.asarray(composite).astype(int)
    assert np.all(np.abs(pixels[50, 12:40] - BLUE) <= 2)
    assert np.all(np.abs(pixels[50, 44:72] - RED) <= 2)


@pytest.mark.parametrize("scale", [0.3, 0.7, 1.3])
@pytest.mark.parametrize("angle", [0.0, 12.0])
def test_scale_sets_the_longest_side(scale, angle):
    image, mask = two_tone_object()
    size = 100
    _, pasted = paste_object(
        image, mask, plain(size), scale=scale, position=np.random.default_rng(0), angle=angle, size=size
    )
    ys, xs = np.nonzero(pasted)
    longest = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert abs(longest - round(scale * BASE_FRACTION * size)) <= 1
    assert compute_object_side(5.0, size) == 95  # clamped so the object still fits in the canvas


def test_random_position_keeps_object_inside():
    image, mask = two_tone_object()
    rng = np.random.default_rng(3)
    for _ in range(20):
        _, pasted = paste_object(image, mask, plain(64), scale=1.3, position=rng, size=64)
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
