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
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from personalization.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
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


def check_inside(path: Path, root: Path) -> Path:
    """``path`` resolved (symlinks followed); raises when it leads outside ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DatasetError(
            f"{path}: resolves to {resolved}, outside the dataset root {root}; copy the file into the dataset "
            "instead of linking to it"
        )
    return resolved


def _open_decoded(path: Path, what: str) -> Image.Image:
    """Open and fully decode one file (a truncated file fails here, not later in a worker)."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} is missing or not a regular file")
    if os.path.getsize(path) == 0:
        raise DatasetError(f"{path}: {what} is an empty (zero-byte) file; re-copy it or remove it")
    try:
        image = Image.open(path)
        image.load()
    except Image.UnidentifiedImageError as error:
        raise DatasetError(f"{path}: not a readable {what} ({error}); re-export it as JPEG/PNG or remove it") from error
    except Image.DecompressionBombError as error:  # the header claims more pixels than Pillow will decode
        raise DatasetError(
            f"{path}: {what} is too large to decode safely ({error}); downscale it (e.g. to 4096 px) or remove it"
        ) from error
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


def load_image(path: str | Path) -> tuple[Image.Image, int]:
    """A photo as upright 8-bit RGB, and the EXIF orientation it had (to apply to its mask)."""
    path = Path(path)
    image = _open_decoded(path, "image")
    tag = orientation(image)
    image = ImageOps.exif_transpose(image) if tag != 1 else image
    return to_rgb(image), tag


def mask_array(image: Image.Image) -> np.ndarray:
    """A decoded mask image -> boolean (H, W). Accepts 0/1 and 0/255 masks, palette label maps and alpha cutouts."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        values = np.asarray(image).astype(np.float64)
        return values > (values.max(initial=0.0) / 2 if values.max(initial=0.0) > 1 else 0)
    if image.mode == "P" and "transparency" not in image.info:
        return np.asarray(image) > 0  # a label map: palette index 0 is the background
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() != alpha.max():  # a cutout: the object is where alpha is
            return alpha > 127
    gray = np.asarray(image.convert("L"))
    # 0/1 masks (max 1) are common; else threshold at half range so JPEG noise does not leak in.
    return gray > 0 if gray.max(initial=0) <= 1 else gray > 127


def load_mask(path: str | Path, image_size: tuple[int, int], image_orientation: int = 1) -> np.ndarray:
    """The boolean (H, W) mask of an image of ``image_size`` = (width, height), after the image's own orientation.

    Raises when the size differs from its image or when the mask holds no object.
    """
    path = Path(path)
    mask = _open_decoded(path, "mask")
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
