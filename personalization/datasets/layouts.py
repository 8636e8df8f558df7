"""Dataset layouts -> a plan of image entries (no pixels read yet).

Layouts:

- ``pods`` / ``dogs`` / ``df2``: ``train/<instance>/*``, ``test/<instance>/*``, ``train_masks/<instance>/*``,
  ``test_masks/<instance>/*``, and (PODS) ``test_dense/<instance>/*`` + ``test_dense_masks/<instance>/*``, with
  ``<layout>_info.json`` = {classes, class_to_idx, class_to_sc (category), class_to_split (val|test)}.
  ``pods_image_annos.json`` (required for PODS, optional for the others) maps an image id to
  {class, split, test_split}. **Image id keys**: the path relative to the dataset root
  (``"test/mug_03/0001.jpg"``); also accepted, in this order: that path without its extension,
  ``"<instance>/<file name>"``, and the bare file stem. Dogs/DF2 test images without annos are
  ``in_distribution``.
- ``folder``: a user's own object: photos at the top of the folder, optional masks in ``masks/``; category from
  ``data.category``, instance id from ``data.instance_id`` or the folder name; split "train", instance split "user".
- ``auto``: the layout whose info file exists, else ``folder``.

``LAYOUTS`` maps each name to a :class:`LayoutSpec` (its info file, by which ``auto`` detects it, its annos file,
its scanner and the files it reads); detection, ``scan_dataset``, the stage cache's listing and the choices of
``data.layout`` all read that table. Each reader is a module: ``info_layout`` (the PODS structure) and
``folder_layout``, both built on the shared pieces of ``scan`` (entries, mask pairing).

Images pair with masks by file STEM (``a.jpg`` <-> ``a.png``), never by listing order. Structural problems
(missing info file or folder, unknown instance, 0 or > 50 train photos, orphan masks, links out of the root) are
collected in an :class:`ErrorLog` so the reader reports them together with the per-image ones.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from personalization.datasets.folder_layout import FOLDER_LAYOUT
from personalization.datasets.images import DatasetError, ErrorLog
from personalization.datasets.info_layout import make_info_layout
from personalization.datasets.scan import TEST_SPLITS, DatasetScan, ImageEntry, LayoutSpec

__all__ = [
    "LAYOUTS",
    "TEST_SPLITS",
    "DatasetScan",
    "ImageEntry",
    "LayoutSpec",
    "detect_layout",
    "layout_choices",
    "make_info_layout",
    "scan_dataset",
]

# In detection order; FALLBACK_LAYOUT is what auto picks when no info file is found.
LAYOUTS: dict[str, LayoutSpec] = {
    spec.name: spec
    for spec in (
        make_info_layout("pods", annos_required=True),
        make_info_layout("dogs"),
        make_info_layout("df2"),
        FOLDER_LAYOUT,
    )
}
FALLBACK_LAYOUT = "folder"


def layout_choices() -> tuple[str, ...]:
    """The values ``data.layout`` accepts: ``auto`` and every registered layout."""
    return ("auto", *LAYOUTS)


def info_file(layout: str) -> str:
    """The info file of a detected ``layout`` ("" for one without, like ``folder``)."""
    return LAYOUTS[layout].info_file


def annos_file(layout: str) -> str:
    return LAYOUTS[layout].annos_file


def detect_layout(root: str | Path, layout: str = "auto") -> str:
    """The concrete layout of ``root``; an explicit layout with an info file must have it."""
    root = Path(root)
    if layout not in layout_choices():
        raise DatasetError(f"data.layout={layout!r} is not one of {layout_choices()}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a folder; pass data.root=DIR")
    if layout == "auto":
        found = [spec for spec in LAYOUTS.values() if spec.info_file and (root / spec.info_file).is_file()]
        if len(found) > 1:
            raise DatasetError(f"{root}: holds several info files {[s.info_file for s in found]}; pass data.layout")
        return found[0].name if found else FALLBACK_LAYOUT
    spec = LAYOUTS[layout]
    if spec.info_file and not (root / spec.info_file).is_file():
        raise DatasetError(
            f"{root / spec.info_file}: missing; the {layout} layout needs it (classes, class_to_sc, "
            f"class_to_split), or pass data.layout={FALLBACK_LAYOUT} for a plain folder of photos"
        )
    return layout


def subsample_test(entries: list[ImageEntry], max_test_images: int, seed: int) -> list[ImageEntry]:
    """Keep at most ``max_test_images`` test images per (instance, split), chosen by a seeded draw."""
    if max_test_images <= 0:
        return entries
    groups: dict[tuple[str, str], list[ImageEntry]] = defaultdict(list)
    for entry in entries:
        if entry.role == "real_test":
            groups[(entry.instance_id, entry.split)].append(entry)
    keep: set[str] = set()
    for (instance, split), group in sorted(groups.items()):
        # A string seed hashes deterministically (not per process like hash()).
        rng = random.Random(f"{seed}/{instance}/{split}")
        chosen = group if len(group) <= max_test_images else rng.sample(group, max_test_images)
        keep.update(e.relpath for e in chosen)
    return [e for e in entries if e.role != "real_test" or e.relpath in keep]


def scan_dataset(
    root: str | Path,
    layout: str = "auto",
    *,
    category: str = "",
    instance_id: str = "",
    max_test_images: int = 0,
    seed: int = 0,
) -> DatasetScan:
    """List every image of a dataset with its row fields; structural problems land in ``scan.errors``."""
    root = Path(root)
    spec = LAYOUTS[detect_layout(root, layout)]
    scan = spec.scan(root, spec, ErrorLog(root), category=category, instance_id=instance_id)
    scan.entries = subsample_test(scan.entries, max_test_images, seed)
    return scan
