"""What every layout reader makes and shares: image entries, the scan, the layout's spec, and the listing of a
folder's images with their masks (paired by file stem, never by listing order)."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from personalization.datasets.images import DatasetError, ErrorLog, check_inside, is_image_file, unread_image_problem

TEST_SPLITS = ("in_distribution", "pose", "distractors", "pose_and_distractors")
MIN_TRAIN_IMAGES, MAX_TRAIN_IMAGES = 1, 50


@dataclass(frozen=True)
class ImageEntry:
    """One image to read: where it is, its mask (or None), and the row fields it will get."""

    path: Path
    relpath: str  # POSIX path relative to the dataset root: the image's identity
    instance_id: str
    category: str
    role: str  # real_train | real_test
    split: str  # train | a test split | test_dense
    instance_split: str  # val | test | user
    mask_path: Path | None = None


@dataclass
class DatasetScan:
    root: Path
    layout: str
    entries: list[ImageEntry] = field(default_factory=list)
    instances: dict[str, dict[str, str]] = field(default_factory=dict)
    errors: ErrorLog | None = None


@dataclass(frozen=True)
class LayoutSpec:
    """One dataset layout: how ``data.layout=auto`` detects it, the files that describe it, and its reader.

    ``scan(root, spec, errors, category=..., instance_id=...)`` lists the images (structural problems go to
    ``errors``); ``list_files(root, spec)`` names every file the layout reads (their sizes and times are the stage
    cache's identity of the data).
    """

    name: str
    scan: Callable[..., DatasetScan]
    list_files: Callable[[Path, LayoutSpec], list[Path]]
    info_file: str = ""  # at the dataset root; auto picks the layout whose info file exists ("" = never detected)
    annos_file: str = ""  # optional (unless annos_required) test-split annotations at the root
    annos_required: bool = False


def list_images(folder: Path, root: Path, errors: ErrorLog) -> dict[str, Path]:
    """Image files directly in ``folder`` by stem; duplicate stems, links out of the root and image files of formats
    that are not read (GIF, PSD, RAW, ...) are errors."""
    by_stem: dict[str, Path] = {}
    if not folder.is_dir():
        return by_stem
    for path in sorted(folder.iterdir()):
        if not is_image_file(path):
            if problem := unread_image_problem(path):
                errors.add(problem)
            continue
        try:
            check_inside(path, root)
        except DatasetError as error:
            errors.add(str(error))
            continue
        if path.stem in by_stem:
            errors.add(
                f"{path}: same file stem as {by_stem[path.stem].name}; images pair with masks by stem, "
                "so rename one of them"
            )
            continue
        by_stem[path.stem] = path
    return by_stem


def pair_masks(
    images: dict[str, Path], mask_folder: Path, root: Path, errors: ErrorLog, required: bool
) -> dict[str, Path | None]:
    """stem -> mask path (or None). A mask whose stem matches no image is an error (a naming mismatch); one that
    differs from an image's stem only in Unicode normalisation or letter case is named with that image."""
    masks = list_images(mask_folder, root, errors)
    loose = {_loose_stem(stem): stem for stem in images}
    for stem, path in masks.items():
        near = loose.get(_loose_stem(stem)) if stem not in images else None
        if near is not None:
            errors.add(_near_stem_problem(path, images[near]))
        elif stem not in images:
            errors.add(
                f"{path}: no image with stem {stem!r} in {mask_folder.name.replace('_masks', '')}/; "
                "name each mask like its image (a.jpg <-> a.png) or remove it"
            )
    paired = {stem: masks.get(stem) for stem in images}
    if required:
        for stem, mask in paired.items():
            if mask is None:
                errors.add(f"{images[stem]}: needs a mask {mask_folder}/{stem}.png; add it or remove the image")
    return paired


def _loose_stem(stem: str) -> str:
    return unicodedata.normalize("NFC", stem).casefold()


def _near_stem_problem(mask: Path, image: Path) -> str:
    """A mask named like ``image`` but for Unicode normalisation (NFC vs NFD: macOS, zip tools) or letter case."""
    if unicodedata.normalize("NFC", mask.stem) == unicodedata.normalize("NFC", image.stem):
        forms = [
            next((f for f in ("NFC", "NFD") if unicodedata.is_normalized(f, p.stem)), "mixed") for p in (mask, image)
        ]
        how = f"Unicode normalisation (the mask's name is {forms[0]}, the image's {forms[1]}: they look alike)"
    else:
        how = (
            "letter case" if mask.stem.casefold() == image.stem.casefold() else "letter case and Unicode normalisation"
        )
    return (
        f"{mask}: pairs with no image, but its stem differs from image {image.name!r} only in {how}; rename the "
        f"mask to {image.stem + mask.suffix!r} so the stems match exactly"
    )


def check_train_count(instance: str, count: int, folder: Path, errors: ErrorLog) -> None:
    if not MIN_TRAIN_IMAGES <= count <= MAX_TRAIN_IMAGES:
        errors.add(
            f"{folder}: instance {instance!r} has {count} train photos; give {MIN_TRAIN_IMAGES} to "
            f"{MAX_TRAIN_IMAGES} (the method expects about 3)"
        )
