"""Safe image and mask loading: every odd file a user may have, against Pillow's own conversions as the oracle."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from personalization.datasets.images import (
    DEFAULT_MAX_PIXELS,
    DatasetError,
    ErrorLog,
    check_inside,
    is_image_file,
    load_image,
    load_mask,
    mask_array,
    to_rgb,
    unread_image_problem,
)


def _rgb(height=20, width=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_plain_rgb_roundtrip(tmp_path):
    array = _rgb()
    Image.fromarray(array).save(tmp_path / "a.png")
    image, tag = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and tag == 1
    np.testing.assert_array_equal(np.asarray(image), array)


@pytest.mark.parametrize("payload", [b"", b"this is not a jpeg at all" * 10])
def test_empty_and_non_image_files_are_rejected(tmp_path, payload):
    path = tmp_path / "photo.jpg"
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match="photo.jpg") as error:
        load_image(path)
    assert ("zero-byte" in str(error.value)) == (payload == b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(_rgb(64, 64)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_image(path)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 20, 40)
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3] = 0, 255, 128
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png")[0]).astype(int)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 20, 40)
    expected = np.rint(255 + (np.array([200, 20, 40]) - 255) * 128 / 255)
    np.testing.assert_allclose(out[0, 2], expected, atol=1)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA"])
def test_other_modes_become_rgb_like_pillow(tmp_path, mode):
    source = Image.fromarray(_rgb(16, 16))
    image = source.convert(mode) if mode != "P" else source.quantize(colors=8)
    ext = "jpg" if mode == "CMYK" else "png"
    image.save(tmp_path / f"a.{ext}")
    out = np.asarray(load_image(tmp_path / f"a.{ext}")[0])
    with Image.open(tmp_path / f"a.{ext}") as reread:
        # Oracle: Pillow's conversion (LA has an opaque alpha here, so compositing changes nothing).
        oracle = np.asarray(reread.convert("RGB"))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, oracle)


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png")[0])
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 200, 30)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png")[0])
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert to_rgb(Image.fromarray(values)).mode == "RGB"


def test_16bit_rgb_is_reduced_to_8bit(tmp_path):
    cv2 = pytest.importorskip("cv2")
    bgr = np.zeros((4, 4, 3), dtype=np.uint16)
    bgr[..., 2], bgr[..., 1], bgr[..., 0] = 65535, 32896, 2570  # R, G, B
    cv2.imwrite(str(tmp_path / "c16.png"), bgr)
    out = np.asarray(load_image(tmp_path / "c16.png")[0]).astype(int)
    np.testing.assert_allclose(out[0, 0], [255, 128, 10], atol=1)


def _exif_pair(tmp_path, orientation):
    """A 40x20 photo stored with an EXIF orientation, a bright block at the stored top-left, and its raw mask."""
    raw = np.full((20, 40, 3), 30, dtype=np.uint8)
    raw[2:8, 3:12] = 250
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[2:8, 3:12] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(tmp_path / "r.jpg", exif=exif, quality=95)
    Image.fromarray(mask).save(tmp_path / "r.png")
    return tmp_path / "r.jpg", tmp_path / "r.png"


@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 2])
def test_exif_rotation_applies_to_image_and_mask(tmp_path, orientation):
    image_path, mask_path = _exif_pair(tmp_path, orientation)
    image, tag = load_image(image_path)
    assert tag == orientation
    with Image.open(image_path) as reread:
        oracle = ImageOps.exif_transpose(reread).convert("RGB")
    assert image.size == oracle.size
    mask = load_mask(mask_path, image.size, tag)
    # The mask follows the block wherever the rotation put it.
    bright = np.asarray(image.convert("L")) > 140
    assert mask.shape == bright.shape
    assert (mask == bright).mean() > 0.98


def test_mask_already_upright_is_accepted(tmp_path):
    image_path, _ = _exif_pair(tmp_path, 6)
    image, tag = load_image(image_path)
    upright = (np.asarray(image.convert("L")) > 140).astype(np.uint8) * 255
    Image.fromarray(upright).save(tmp_path / "u.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "u.png", image.size, tag), upright > 0)


def test_mask_checks(tmp_path):
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(DatasetError, match="empty.png: mask has no object"):
        load_mask(tmp_path / "empty.png", (30, 20))
    Image.fromarray(np.full((21, 30), 255, dtype=np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(DatasetError, match="big.png: mask is 30x21 but its image is 30x20"):
        load_mask(tmp_path / "big.png", (30, 20))
    ones = np.zeros((20, 30), dtype=np.uint8)
    ones[5:10, 5:10] = 1  # a 0/1 mask
    Image.fromarray(ones).save(tmp_path / "ones.png")
    assert load_mask(tmp_path / "ones.png", (30, 20)).sum() == 25


def test_mask_array_variants():
    cutout = np.zeros((4, 4, 4), dtype=np.uint8)
    cutout[..., :3] = 255
    cutout[1:3, 1:3, 3] = 255
    assert mask_array(Image.fromarray(cutout, mode="RGBA")).sum() == 4
    labels = Image.fromarray(np.array([[0, 2], [1, 0]], dtype=np.uint8), mode="L").convert("P")
    assert mask_array(labels).tolist() == [[False, True], [True, False]]
    assert mask_array(Image.fromarray(np.array([[0, 40000]], dtype=np.uint16))).tolist() == [[False, True]]


def test_symlink_out_of_root_is_rejected(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.jpg"
    root.mkdir()
    Image.fromarray(_rgb()).save(outside)
    (root / "link.jpg").symlink_to(outside)
    with pytest.raises(DatasetError, match="outside the dataset root"):
        check_inside(root / "link.jpg", root)
    Image.fromarray(_rgb()).save(root / "real.jpg")
    (root / "ok.jpg").symlink_to(root / "real.jpg")
    assert check_inside(root / "ok.jpg", root) == (root / "real.jpg").resolve()


def test_error_log_lists_at_most_twenty(tmp_path):
    log = ErrorLog(tmp_path)
    log.raise_if_any()  # nothing to report
    for i in range(23):
        log.add(f"problem {i}")
    with pytest.raises(DatasetError) as error:
        log.raise_if_any()
    text = str(error.value)
    assert text.startswith("23 problem(s)") and "problem 19" in text and "problem 20" not in text
    assert "... and 3 more" in text


# --- What is read at all: photo formats, a pixel limit, permissions (issue 11, part 4) ---

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


def _saved_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "kind"), [(EPS, "PostScript/EPS"), (_saved_bytes(Image.new("RGB", (8, 8)), "GIF"), "GIF")]
)
def test_files_in_other_formats_are_not_decoded_whatever_their_extension(tmp_path, payload, kind):
    path = tmp_path / "photo.jpg"
    path.write_bytes(payload)
    with Image.open(path) as unrestricted:  # the oracle: Pillow alone would open it (EPS goes on to Ghostscript)
        assert unrestricted.format in ("EPS", "GIF")
    with pytest.raises(DatasetError) as error:
        load_image(path)
    text = str(error.value)
    assert text.startswith(f"{path}: not a readable image in a photo format (it is {kind};")
    assert "re-export it as JPEG/PNG" in text and "corrupt" not in text


def test_pixel_limit_is_an_error_before_decoding_and_is_restored(tmp_path):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "big.png")  # 4096 pixels
    before = Image.MAX_IMAGE_PIXELS
    # 3000 lies in Pillow's warn-only zone (limit..2x limit), 1000 in its error zone: both are errors here.
    for limit in (3000, 1000):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning may escape
            with pytest.raises(DatasetError) as error:
                load_image(tmp_path / "big.png", max_pixels=limit)
        text = str(error.value)
        assert text.startswith(f"{tmp_path / 'big.png'}: image is too large: 4,096 pixels")
        assert f"data.max_pixels={limit}" in text and "raise data.max_pixels" in text
    assert load_image(tmp_path / "big.png", max_pixels=4096)[0].size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == before


def test_mask_pixel_limit(tmp_path):
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DatasetError, match="m.png: mask is too large: 4,096 pixels"):
        load_mask(tmp_path / "m.png", (64, 64), max_pixels=100)


def test_default_pixel_limit_matches_the_config():
    from personalization.config import ConfigError, DataConfig, load_config

    assert DataConfig().max_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(ConfigError, match="data.max_pixels"):
        load_config(overrides=["data.max_pixels=0"])


@pytest.mark.parametrize(("ext", "fmt"), [("heic", "HEIF"), ("avif", "AVIF")])
def test_heic_and_avif_photos_are_read(tmp_path, ext, fmt):
    pillow_heif = pytest.importorskip("pillow_heif") if fmt == "HEIF" else None
    if pillow_heif is not None:
        pillow_heif.register_heif_opener()  # only to write the file; load_image registers it for reading
    array = np.zeros((32, 48, 3), np.uint8)
    array[:, :24] = (220, 30, 30)
    array[:, 24:] = (20, 40, 200)
    Image.fromarray(array).save(tmp_path / f"p.{ext}", quality=95)
    assert is_image_file(tmp_path / f"p.{ext}")
    image, tag = load_image(tmp_path / f"p.{ext}")
    assert image.mode == "RGB" and image.size == (48, 32) and tag == 1
    # Lossy codecs: the colours are close, away from the edge between the halves.
    out = np.asarray(image).astype(int)
    assert np.abs(out[:, :20] - (220, 30, 30)).mean() < 12 and np.abs(out[:, 28:] - (20, 40, 200)).mean() < 12


@pytest.mark.parametrize("name", ["clip.gif", "edit.PSD", "shot.dng", "logo.svg"])
def test_image_files_that_are_not_read_are_named(name):
    problem = unread_image_problem(Path("/data") / name)
    assert problem.startswith(f"/data/{name}: ") and "convert it to JPEG or PNG, or remove it" in problem
    assert unread_image_problem(Path("/data/notes.txt")) is None and unread_image_problem(Path("/d/.x.gif")) is None


def _read_as_nobody(path: Path) -> str:
    """load_image(path) in a forked child that dropped root to uid/gid 65534: the error text, or 'read'."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            load_image(path)
            message = "read"
        except BaseException as error:  # noqa: BLE001 - reported to the parent as text
            message = f"{type(error).__name__}: {error}"
        os.write(writer, message.encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader) as pipe:
        return pipe.read()


def test_unreadable_file_is_reported_as_permission_denied_not_corrupt(tmp_path):
    # As root chmod blocks nothing, so the read happens in a child that dropped to an unprivileged user; the
    # folder must then be one that user may enter (pytest's tmp_path is private to root).
    folder = Path(tempfile.mkdtemp()) if os.geteuid() == 0 else tmp_path
    try:
        folder.chmod(0o755)
        Image.fromarray(_rgb()).save(folder / "locked.png")
        load_image(folder / "locked.png")  # readable before the chmod (and every decoder is imported now)
        (folder / "locked.png").chmod(0)
        if os.geteuid() == 0:
            text = _read_as_nobody(folder / "locked.png")
        else:
            with pytest.raises(DatasetError) as error:
                load_image(folder / "locked.png")
            text = f"DatasetError: {error.value}"
        assert text == (
            f"DatasetError: {folder / 'locked.png'}: cannot read image: permission denied; fix with "
            f"`chmod a+r {folder / 'locked.png'}` (or run as its owner)"
        )
    finally:
        (folder / "locked.png").chmod(0o644)
        if folder != tmp_path:
            shutil.rmtree(folder)


def test_coloured_masks_are_the_object_on_any_channel(tmp_path):
    labels = np.zeros((20, 30, 3), np.uint8)
    labels[2:8, 3:10] = (255, 0, 0)  # a red label
    labels[10:15, 12:20] = (64, 0, 0)  # a dark VOC-palette label colour
    labels[16:19, 25:28] = (0, 0, 1)  # a 0/1 style label in the blue channel
    Image.fromarray(labels).save(tmp_path / "labels.png")
    expected = labels.max(axis=2) > 0
    np.testing.assert_array_equal(load_mask(tmp_path / "labels.png", (30, 20)), expected)
    # A red mask saved as JPEG: graded (noise), so read at half range of its brightest channel.
    red = np.zeros((32, 32, 3), np.uint8)
    red[8:24, 8:24] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.jpg", quality=90)
    np.testing.assert_array_equal(load_mask(tmp_path / "red.jpg", (32, 32)), red[..., 0] > 0)
    # An opaque RGBA mask is read by its colour; one whose alpha varies by its alpha (a cutout).
    opaque = np.dstack([labels, np.full((20, 30), 255, np.uint8)])
    np.testing.assert_array_equal(mask_array(Image.fromarray(opaque, mode="RGBA")), expected)
    cutout = np.zeros((20, 30, 4), np.uint8)
    cutout[..., :3] = 255
    cutout[5:9, 5:9, 3] = 255
    assert mask_array(Image.fromarray(cutout, mode="RGBA")).sum() == 16


def test_table_bytes_are_decoded_as_png_only(tmp_path):
    from personalization.schema import SchemaError, decode_image, decode_mask, encode_mask

    assert decode_mask(encode_mask(np.eye(4, dtype=bool))).tolist() == np.eye(4, dtype=bool).tolist()
    jpeg = _saved_bytes(Image.fromarray(_rgb()), "JPEG")
    assert decode_image(jpeg).size == (30, 20)  # train.negatives_dir rows keep a user's JPEG bytes
    with pytest.raises(SchemaError, match="mask bytes are not PNG"):
        decode_mask(jpeg)
    with pytest.raises(SchemaError, match="image bytes are not PNG/JPEG/WEBP/BMP"):
        decode_image(EPS)
