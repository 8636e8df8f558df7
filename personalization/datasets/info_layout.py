"""The PODS folder structure (PODS, DogFaceNet, DeepFashion2): ``train/<instance>/*``, ``test/<instance>/*``,
``test_dense/<instance>/*`` and their ``*_masks`` twins, described by ``<layout>_info.json`` and the test splits in
``<layout>_image_annos.json`` (key rules: :mod:`personalization.datasets.layouts`)."""

from __future__ import annotations

import json
from pathlib import Path

from personalization.datasets.images import ErrorLog, is_image_file
from personalization.datasets.scan import (
    TEST_SPLITS,
    DatasetScan,
    ImageEntry,
    LayoutSpec,
    check_train_count,
    list_images,
    pair_masks,
)
from personalization.paths import NAME_RULE, is_safe_name

# (image folder, mask folder, role, masks required)
LAYOUT_FOLDERS = (
    ("train", "train_masks", "real_train", False),
    ("test", "test_masks", "real_test", False),
    ("test_dense", "test_dense_masks", "real_test", True),  # dense = annotated for detection/segmentation
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
                check_train_count(instance, len(images), folder, errors)
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


def list_info_layout_files(root: Path, spec: LayoutSpec) -> list[Path]:
    """The info and annos files and every image and mask under the PODS folders (whether or not they exist)."""
    files = [root / spec.info_file, root / spec.annos_file]
    for image_folder, mask_folder, _role, _required in LAYOUT_FOLDERS:
        for top in (root / image_folder, root / mask_folder):
            files.extend(p for p in top.glob("*/*") if is_image_file(p))
    return files


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
