"""A user's own object: photos at the top of a folder, optional masks in ``masks/``; the category comes from
``data.category``, the instance id from ``data.instance_id`` or the folder's name."""

from __future__ import annotations

from pathlib import Path

from personalization.datasets.images import ErrorLog, is_image_file
from personalization.datasets.scan import (
    DatasetScan,
    ImageEntry,
    LayoutSpec,
    check_train_count,
    list_images,
    pair_masks,
)
from personalization.paths import NAME_RULE, is_safe_name, slugify


def scan_folder_layout(
    root: Path, spec: LayoutSpec, errors: ErrorLog, *, category: str = "", instance_id: str = ""
) -> DatasetScan:
    """A user's own object: photos at the top of ``root``, optional masks in ``masks/``."""
    scan = DatasetScan(root=root, layout=spec.name, errors=errors)
    if not category:
        errors.add(
            f"{root}: a plain folder of photos needs its object's category; pass data.category=NAME "
            "(e.g. data.category=mug)"
        )
        return scan
    if not is_safe_name(category):
        errors.add(f"data.category={category!r} cannot name an output folder; use {NAME_RULE}")
        return scan
    if instance_id and not is_safe_name(instance_id):
        errors.add(f"data.instance_id={instance_id!r} cannot name an output folder; use {NAME_RULE}")
        return scan
    instance = instance_id or slugify(root.resolve().name)
    images = list_images(root, root, errors)
    check_train_count(instance, len(images), root, errors)
    masks = pair_masks(images, root / "masks", root, errors, required=False)
    scan.instances[instance] = {"category": category, "split": "user"}
    for stem, path in images.items():
        scan.entries.append(
            ImageEntry(
                path, path.relative_to(root).as_posix(), instance, category, "real_train", "train", "user", masks[stem]
            )
        )
    return scan


def list_folder_layout_files(root: Path, spec: LayoutSpec) -> list[Path]:
    """The photos at the top of ``root`` and the masks in ``masks/``."""
    folders = [root, root / "masks"]
    return [p for folder in folders if folder.is_dir() for p in folder.iterdir() if is_image_file(p)]


FOLDER_LAYOUT = LayoutSpec("folder", scan_folder_layout, list_folder_layout_files)
