"""Safe loading of dataset photos and masks: whatever a camera or an editor wrote -> RGB + boolean mask.

Every loader raises :class:`DatasetError` naming the file and the fix; a reader collects those errors over a whole
dataset (:class:`ErrorLog`) and raises them together, so a user fixes everything in one round.

What is normalized, not rejected:

- EXIF orientation is applied (``ImageOps.exif_transpose``) and the *same* flip/rotation is applied to the image's
  mask, because masks are usually drawn on the stored pixel grid (tools read the raw array). A mask that carries
  its own EXIF orientation is transposed by its own tag instead.
- Alpha (RGBA, LA, palette with transparency) is composited on white; grayscale, palette, CMYK, YCbCr -> RGB.
- 16-bit grayscale (``I;16``, ``I``) is scaled to 8 bits by ``round(v / 257)`` (65535 -> 255); Pillow already
  reduces 16-bit RGB PNG/TIFF to 8 bits on decode.

Truncated files are found by forcing a full decode (``Image.load()``); ``LOAD_TRUNCATED_IMAGES`` is left off.

What is read at all: only photo formats (``PHOTO_FORMATS``: JPEG, PNG, BMP, TIFF, WEBP, AVIF, and HEIC/HEIF through
the pinned ``pillow-heif`` plugin), whatever the file's extension says, so an EPS renamed ``.jpg`` never reaches
Ghostscript. A file's pixel count is checked against ``max_pixels`` (``data.max_pixels``) from its header, before
anything is decoded. Image files of other formats (GIF, PSD, RAW, ...) are reported by name, never skipped.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from personalization.errors import UserError

# The Pillow decoders a dataset file may go through (``Image.open(formats=...)``): photo formats only.
PHOTO_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "AVIF", "HEIF")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".avif", ".heic", ".heif")
# Image files that are listed but not read, by extension: reported by name so no photo is skipped silently.
# GIF is reported rather than read: 256 colours at most (a quantized photo) and often an animation.
UNREAD_EXTENSIONS = {
    ".gif": "GIF",
    ".psd": "Photoshop PSD",
    ".eps": "EPS",
    ".svg": "SVG",
    ".pdf": "PDF",
    ".jxl": "JPEG XL",
    ".jp2": "JPEG 2000",
    **dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"), "camera RAW"),
}
# (offset, leading bytes, format) of files that are not photos, to name what a mislabeled file really is.
_SIGNATURES = (
    (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"%PDF", "PDF"),
    (0, b"GIF8", "GIF"),
    (0, b"8BPS", "Photoshop PSD"),
    (0, b"<?xml", "XML/SVG"),
    (0, b"<svg", "SVG"),
    (4, b"ftyphei", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
)
DEFAULT_MAX_PIXELS = 100_000_000  # = DataConfig.max_pixels: 48-100 MP camera photos pass, a bomb header does not
HARD_MASK_LEVELS = 16  # a mask with at most this many grey levels is a drawn/label mask: any non-zero is object
MAX_ERRORS_SHOWN = 20
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the PIL transpose that undoes it (the EXIF 2.3 table).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError)


class DatasetError(UserError):
    """A dataset file or folder that cannot be read as asked; the message names the file and the fix."""


class ErrorLog:
    """Collects problems over a whole dataset, then raises them as one :class:`DatasetError`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.errors: list[str] = []

    def add(self, message: str) -> None:
        self.errors.append(message)

    def __bool__(self) -> bool:
        return bool(self.errors)

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        # Paths inside the root are shown relative to it (the header names the root once).
        shown = "\n".join(f"  - {e.replace(f'{self.root}/', '')}" for e in self.errors[:MAX_ERRORS_SHOWN])
        more = len(self.errors) - MAX_ERRORS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DatasetError(f"{len(self.errors)} problem(s) in dataset {self.root}:\n{shown}{tail}")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def unread_image_problem(path: Path) -> str | None:
    """The error for an image file of a format that is not read (GIF, PSD, RAW, ...), or None."""
    kind = UNREAD_EXTENSIONS.get(path.suffix.lower())
    if kind is None or path.name.startswith("."):
        return None
    return (
        f"{path}: {kind} files are not read (photos must be {', '.join(_photo_format_names())}); "
        "convert it to JPEG or PNG, or remove it"
    )


def check_inside(path: Path, root: Path) -> Path:
    """``path`` resolved (symlinks followed); raises when it leads outside ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DatasetError(
            f"{path}: resolves to {resolved}, outside the dataset root {root}; copy the file into the dataset "
            "instead of linking to it"
        )
    return resolved


@cache
def _heif_plugin() -> bool:
    """Register the HEIC/HEIF decoder (pillow-heif) on first use; False when the package is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _photo_formats() -> tuple[str, ...]:
    return PHOTO_FORMATS if _heif_plugin() else tuple(f for f in PHOTO_FORMATS if f != "HEIF")


def _photo_format_names() -> list[str]:
    return [{"HEIF": "HEIC"}.get(name, name) for name in _photo_formats()]


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pixel_limit(max_pixels: int):
    """Pillow's decompression-bomb check at ``max_pixels`` for the calls inside, as an error (not a warning).

    Pillow only warns between its limit and twice it; the warning is raised here. Both settings are process-wide,
    hence the lock; only the header parse runs under it.
    """
    with _PIXEL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _not_a_photo(path: Path, what: str) -> str:
    """The error for a file no photo decoder accepts, naming what it really is when its first bytes tell."""
    with open(path, "rb") as file:
        head = file.read(16)
    kind = next((name for offset, magic, name in _SIGNATURES if head[offset:].startswith(magic)), None)
    if kind in ("HEIC", "HEIF") and not _heif_plugin():
        return (
            f"{path}: {what} is {kind}, which needs the pillow-heif package (pip install -r requirements.txt); "
            "or convert it to JPEG/PNG"
        )
    found = f"it is {kind}; " if kind else ""
    return (
        f"{path}: not a readable {what} in a photo format ({found}only {', '.join(_photo_format_names())} are "
        "read); re-export it as JPEG/PNG or remove it"
    )


def _too_large(path: Path, what: str, max_pixels: int, error: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)):,} pixels ({int(found.group(1)) / 1e6:.1f} MP)" if found else str(error)
    return (
        f"{path}: {what} is too large: {size}, over the limit data.max_pixels={max_pixels} "
        f"({max_pixels / 1e6:g} MP), checked before decoding; downscale it (e.g. to 4096 px) or raise data.max_pixels"
    )


def _open_decoded(path: Path, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (photo formats only, at most ``max_pixels``) and fully decode one file: a truncated file fails here."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} is missing or not a regular file")
    if os.path.getsize(path) == 0:
        raise DatasetError(f"{path}: {what} is an empty (zero-byte) file; re-copy it or remove it")
    try:
        with _pixel_limit(max_pixels):
            image = Image.open(path, formats=_photo_formats())
        image.load()
    except PermissionError as error:
        raise DatasetError(
            f"{path}: cannot read {what}: permission denied; fix with `chmod a+r {path}` (or run as its owner)"
        ) from error
    except Image.UnidentifiedImageError as error:
        raise DatasetError(_not_a_photo(path, what)) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DatasetError(_too_large(path, what, max_pixels, error)) from error
    except _DECODE_ERRORS as error:
        raise DatasetError(f"{path}: {what} is corrupt or truncated ({error}); re-copy it or remove it") from error
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, also when there is no EXIF)."""
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF is treated as upright, as exif_transpose does
        return 1


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 'L', scaled (not clipped) to 0..255."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
    else:
        values = values / 257.0  # full 16-bit range onto 8 bits: 65535 -> 255, 257 -> 1
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        image = _to_8bit_gray(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, int]:
    """A photo as upright 8-bit RGB, and the EXIF orientation it had (to apply to its mask)."""
    path = Path(path)
    image = _open_decoded(path, "image", max_pixels)
    tag = orientation(image)
    image = ImageOps.exif_transpose(image) if tag != 1 else image
    return to_rgb(image), tag


def _binarise(values: np.ndarray) -> np.ndarray:
    """8-bit levels -> object. A hard mask (at most ``HARD_MASK_LEVELS`` levels: 0/1, 0/255, label colours) is the
    object wherever it is non-zero; a graded one (JPEG noise, soft edges) wherever it is above half range."""
    levels = np.count_nonzero(np.bincount(values.ravel(), minlength=256))
    return values > 0 if levels <= HARD_MASK_LEVELS else values > 127


def mask_array(image: Image.Image) -> np.ndarray:
    """A decoded mask image -> boolean (H, W), the object wherever any colour channel is on.

    0/1 and 0/255 masks, coloured labels on black (a red label is the object), palette label maps (index 0 is the
    background) and cutouts (an alpha that varies is the object's shape; a constant alpha is ignored).
    """
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        values = np.asarray(image).astype(np.float64)
        return values > (values.max(initial=0.0) / 2 if values.max(initial=0.0) > 1 else 0)
    if image.mode == "P" and "transparency" not in image.info:
        return np.asarray(image) > 0  # a label map: palette index 0 is the background
    if image.mode == "P" or image.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        if alpha.min() != alpha.max():  # a cutout: the object is where alpha is
            return _binarise(alpha)
    if image.mode in ("L", "1"):
        return _binarise(np.asarray(image.convert("L")))
    return _binarise(np.asarray(image.convert("RGB")).max(axis=2))


def load_mask(
    path: str | Path, image_size: tuple[int, int], image_orientation: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """The boolean (H, W) mask of an image of ``image_size`` = (width, height), after the image's own orientation.

    Raises when the size differs from its image or when the mask holds no object.
    """
    path = Path(path)
    mask = _open_decoded(path, "mask", max_pixels)
    own = orientation(mask)
    if own != 1:
        mask = ImageOps.exif_transpose(mask)
    elif image_orientation in _ORIENTATION_FIX:
        turned = mask.transpose(_ORIENTATION_FIX[image_orientation])
        # A 90-degree tag and a mask that already has the upright size: it was drawn on the upright image.
        mask = mask if (turned.size != tuple(image_size) and mask.size == tuple(image_size)) else turned
    if mask.size != tuple(image_size):
        raise DatasetError(
            f"{path}: mask is {mask.size[0]}x{mask.size[1]} but its image is {image_size[0]}x{image_size[1]} "
            "(after EXIF rotation); re-make the mask at the image's size"
        )
    array = mask_array(mask)
    if not array.any():
        raise DatasetError(f"{path}: mask has no object pixels (all background); re-make it or remove it")
    return array
