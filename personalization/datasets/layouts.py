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
``data.layout`` all read that table.

Images pair with masks by file STEM (``a.jpg`` <-> ``a.png``), never by listing order. Structural problems
(missing info file or folder, unknown instance, 0 or > 50 train photos, orphan masks, links out of the root) are
collected in an :class:`ErrorLog` so the reader reports them together with the per-image ones.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from personalization.datasets.images import (
    DatasetError,
    ErrorLog,
    check_inside,
    is_image_file,
    unread_image_problem,
)
from personalization.paths import NAME_RULE, is_safe_name, slugify

TEST_SPLITS = ("in_distribution", "pose", "distractors", "pose_and_distractors")
MIN_TRAIN_IMAGES, MAX_TRAIN_IMAGES = 1, 50
# (image folder, mask folder, role, masks required)
LAYOUT_FOLDERS = (
    ("train", "train_masks", "real_train", False),
    ("test", "test_masks", "real_test", False),
    ("test_dense", "test_dense_masks", "real_test", True),  # dense = annotated for detection/segmentation
)


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


def _check_train_count(instance: str, count: int, folder: Path, errors: ErrorLog) -> None:
    if not MIN_TRAIN_IMAGES <= count <= MAX_TRAIN_IMAGES:
        errors.add(
            f"{folder}: instance {instance!r} has {count} train photos; give {MIN_TRAIN_IMAGES} to "
            f"{MAX_TRAIN_IMAGES} (the method expects about 3)"
        )


def _read_json(path: Path, errors: ErrorLog) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        errors.add(f"{path}: cannot be read as JSON ({error}); fix or re-download it")
        return None
    if not isinstance(data, dict):
        errors.add(f"{path}: must hold a JSON object, got {type(data).__name__}")
        return None
    return data


class _Annos:
    """Lookup of the test split of a test image in ``<layout>_image_annos.json``."""

    def __init__(self, path: Path, annos: dict | None, required: bool) -> None:
        self.path, self.annos, self.required = path, annos or {}, required

    def test_split(self, relpath: str, instance: str, errors: ErrorLog) -> str | None:
        if not self.annos and not self.required:
            return "in_distribution"
        name = relpath.rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0]
        for key in (relpath, relpath.rsplit(".", 1)[0], f"{instance}/{name}", stem):
            if key in self.annos:
                anno = self.annos[key]
                break
        else:
            errors.add(
                f"{relpath}: no entry in {self.path.name}; key it by its path relative to the root "
                f"({relpath!r}) or its file stem, or remove the image"
            )
            return None
        split = anno.get("test_split") if isinstance(anno, dict) else None
        if split not in TEST_SPLITS:
            errors.add(f"{self.path.name}[{key!r}]: test_split {split!r} is not one of {TEST_SPLITS}")
            return None
        if anno.get("class", instance) != instance:
            errors.add(
                f"{self.path.name}[{key!r}]: class {anno.get('class')!r} but the image is in the folder of "
                f"{instance!r}; key annos by relative path when file stems repeat across instances"
            )
            return None
        return split


def _checked_names(names: list, where: str, errors: ErrorLog) -> list[str]:
    """The safe instance ids of ``names``; every other one is an error naming its index (ids become folders)."""
    kept = []
    for index, name in enumerate(names):
        if is_safe_name(name):
            kept.append(name)
        else:
            errors.add(f"{where}[{index}] = {name!r} cannot name an output folder; use a string of {NAME_RULE}")
    return kept


def scan_info_layout(root: Path, spec: LayoutSpec, errors: ErrorLog, **_folder_options: str) -> DatasetScan:
    """The PODS folder structure, described by ``spec.info_file`` (and ``spec.annos_file``); the plain-folder
    settings (category, instance_id) do not apply: the info file names both."""
    scan = DatasetScan(root=root, layout=spec.name, errors=errors)
    info_path = root / spec.info_file
    info = _read_json(info_path, errors)
    if info is None:
        return scan
    missing = [key for key in ("classes", "class_to_sc", "class_to_split") if key not in info]
    if missing:
        errors.add(f"{info_path}: lacks keys {missing}; it needs classes, class_to_sc and class_to_split")
        return scan
    if not (
        isinstance(info["classes"], list)
        and isinstance(info["class_to_sc"], dict)
        and isinstance(info["class_to_split"], dict)
    ):
        errors.add(f"{info_path}: classes must be a list, class_to_sc and class_to_split objects")
        return scan
    annos_path = root / spec.annos_file
    annos = _read_json(annos_path, errors) if annos_path.is_file() else None
    if spec.annos_required and not annos_path.is_file():
        errors.add(f"{annos_path}: missing; {spec.name.upper()} needs it to know each test image's test_split")
    lookup = _Annos(annos_path, annos, required=spec.annos_required)

    classes = _checked_names(info["classes"], f"{info_path}: classes", errors)
    for folder in ("train", "test", "test_dense"):
        if (root / folder).is_dir():
            for extra in sorted(p.name for p in (root / folder).iterdir() if p.is_dir()):
                if extra not in classes:
                    errors.add(
                        f"{root / folder / extra}: instance not in {info_path.name} classes; add it there "
                        "or remove the folder"
                    )
    for instance in classes:
        category = info["class_to_sc"].get(instance)
        split = info["class_to_split"].get(instance)
        if not category:
            errors.add(f"{info_path}: class_to_sc has no category for {instance!r}")
            continue
        if not is_safe_name(category):
            errors.add(
                f"{info_path}: class_to_sc[{instance!r}] = {category!r} cannot name an output folder; use a "
                f"string of {NAME_RULE}"
            )
            continue
        if split not in ("val", "test"):
            errors.add(f"{info_path}: class_to_split[{instance!r}] is {split!r}; use 'val' or 'test'")
            continue
        scan.instances[instance] = {"category": str(category), "split": split}
        for image_folder, mask_folder, role, masks_required in LAYOUT_FOLDERS:
            folder = root / image_folder / instance
            images = list_images(folder, root, errors)
            if image_folder == "train":
                _check_train_count(instance, len(images), folder, errors)
            masks = pair_masks(images, root / mask_folder / instance, root, errors, masks_required)
            for stem, path in images.items():
                relpath = path.relative_to(root).as_posix()
                image_split = image_folder
                if image_folder == "test":
                    image_split = lookup.test_split(relpath, instance, errors)
                    if image_split is None:
                        continue
                scan.entries.append(
                    ImageEntry(path, relpath, instance, str(category), role, image_split, split, masks[stem])
                )
    return scan


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
    _check_train_count(instance, len(images), root, errors)
    masks = pair_masks(images, root / "masks", root, errors, required=False)
    scan.instances[instance] = {"category": category, "split": "user"}
    for stem, path in images.items():
        scan.entries.append(
            ImageEntry(
                path, path.relative_to(root).as_posix(), instance, category, "real_train", "train", "user", masks[stem]
            )
        )
    return scan


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


def list_info_layout_files(root: Path, spec: LayoutSpec) -> list[Path]:
    """The info and annos files and every image and mask under the PODS folders (whether or not they exist)."""
    files = [root / spec.info_file, root / spec.annos_file]
    for image_folder, mask_folder, _role, _required in LAYOUT_FOLDERS:
        for top in (root / image_folder, root / mask_folder):
            files.extend(p for p in top.glob("*/*") if is_image_file(p))
    return files


def list_folder_layout_files(root: Path, spec: LayoutSpec) -> list[Path]:
    """The photos at the top of ``root`` and the masks in ``masks/``."""
    folders = [root, root / "masks"]
    return [p for folder in folders if folder.is_dir() for p in folder.iterdir() if is_image_file(p)]


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


def make_info_layout(name: str, annos_required: bool = False) -> LayoutSpec:
    """A layout in the PODS folder structure, described by ``<name>_info.json`` (+ ``<name>_image_annos.json``)."""
    return LayoutSpec(
        name,
        scan_info_layout,
        list_info_layout_files,
        info_file=f"{name}_info.json",
        annos_file=f"{name}_image_annos.json",
        annos_required=annos_required,
    )


# In detection order; FALLBACK_LAYOUT is what auto picks when no info file is found.
LAYOUTS: dict[str, LayoutSpec] = {
    spec.name: spec
    for spec in (
        make_info_layout("pods", annos_required=True),
        make_info_layout("dogs"),
        make_info_layout("df2"),
        LayoutSpec("folder", scan_folder_layout, list_folder_layout_files),
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
