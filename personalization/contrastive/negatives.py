"""Where an instance's negatives come from: ``train.negatives=auto`` resolved once, and the stock photos.

Resolution of ``auto`` for the instances a run trains (:func:`choose_negatives`), first that applies:

1. ``generated``: generation is on and makes category negatives (``generate.negatives_per_category > 0``).
2. ``val``: every trained instance has another ``val`` instance of its category in the dataset (PODS, the toy).
3. ``folder``: ``train.negatives_dir`` is given.
4. ``stock``: ``train.stock_negatives=true``: generic real photos that ship with scikit-image and matplotlib
   (people, a cat, a cup, a motorcycle, a rocket, coins, textures...), each also cut into four corner crops.
   These are *easy* negatives, not other objects of the category: enough to train on a lone folder of photos on
   a laptop (``configs/demo.yaml`` turns them on), weaker than category negatives.

Otherwise a :class:`UserError` names the fixes. A plain folder of a user's photos has no val instances, so
without generation it needs ``negatives_dir`` or the stock photos.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
from PIL import Image

from personalization.errors import UserError
from personalization.schema import IMAGE_SCHEMA, make_image_id, make_row, rows_to_table

MODES = ("val", "folder", "generated", "stock")
# Real photos in scikit-image's data folder (no download needed) and matplotlib's sample data.
STOCK_PHOTOS = (
    ("skimage", "astronaut.png"),
    ("skimage", "camera.png"),
    ("skimage", "chelsea.png"),
    ("skimage", "coffee.png"),
    ("skimage", "coins.png"),
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "ihc.png"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "rocket.jpg"),
    ("skimage", "retina.jpg"),
    ("skimage", "brick.png"),
    ("skimage", "grass.png"),
    ("skimage", "gravel.png"),
    ("skimage", "text.png"),
    ("matplotlib", "grace_hopper.jpg"),
)
STOCK_SIDE = 512  # longer side kept (the encoders eat 224 px)
CROP = 2 / 3  # each stock photo also gives its four corner crops of this side fraction


def _val_lacking(instances: Mapping[str, Mapping[str, str]], selected: Sequence[str]) -> list[str]:
    """The selected instances with no other val instance of their category."""
    lacking = []
    for instance in selected:
        category = instances[instance]["category"]
        if not any(v["split"] == "val" and v["category"] == category and k != instance for k, v in instances.items()):
            lacking.append(instance)
    return lacking


def choose_negatives(
    train_cfg, generate_cfg, instances: Mapping[str, Mapping[str, str]], selected: Sequence[str]
) -> str:
    """The concrete ``train.negatives`` mode for training ``selected`` (see the module docstring).

    ``instances``: ``{instance_id: {"category", "split"}}`` of the dataset (``instances.json``). An explicit mode
    is returned as given (the config refused ``generated`` without generation when it was built).
    """
    generates = generate_cfg.enabled and generate_cfg.negatives_per_category > 0
    if train_cfg.negatives != "auto":
        return train_cfg.negatives
    if generates:
        return "generated"
    lacking = _val_lacking(instances, selected)
    if not lacking:
        return "val"
    if train_cfg.negatives_dir:
        return "folder"
    if train_cfg.stock_negatives:
        return "stock"
    categories = sorted({instances[i]["category"] for i in lacking})
    raise UserError(
        f"train.negatives=auto found no negatives for {lacking} (category {', '.join(categories)}): the dataset has "
        "no other val instance of that category, generation is off and train.negatives_dir is empty. Fix one of: "
        "pass train.negatives_dir=DIR, a folder of photos that do not show your object (best: other objects of "
        f"the same category; a {categories[0]}_negatives/ subfolder is read first); or train.stock_negatives=true "
        "(generic real photos shipped with scikit-image: easy negatives, weaker; configs/demo.yaml sets it); or "
        "turn on generation (dreambooth.enabled=true generate.enabled=true, a GPU) to sample category negatives"
    )


def stock_photo_paths() -> list[Path]:
    """The stock photos on this machine (scikit-image and matplotlib are dependencies of the project)."""
    import matplotlib
    import skimage

    roots = {
        "skimage": Path(skimage.__file__).parent / "data",
        "matplotlib": Path(matplotlib.get_data_path()) / "sample_data",
    }
    paths = [roots[package] / name for package, name in STOCK_PHOTOS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"stock negatives: {missing} not found; reinstall scikit-image / matplotlib")
    return paths


def _crops(image: Image.Image) -> list[Image.Image]:
    width, height = image.size
    w, h = round(width * CROP), round(height * CROP)
    corners = [(0, 0), (width - w, 0), (0, height - h), (width - w, height - h)]
    return [image] + [image.crop((x, y, x + w, y + h)) for x, y in corners]


@functools.lru_cache(maxsize=8)
def load_stock_negatives(category: str) -> pa.Table:
    """Image rows (role ``negative``, source ``pretrained``): every stock photo and its four corner crops (RGB).
    Cached per category for the process (train plans an object's triplets and then reads its rows: one decode)."""
    rows = []
    for path in stock_photo_paths():
        with Image.open(path) as image:
            photo = image.convert("RGB")
        photo.thumbnail((STOCK_SIDE, STOCK_SIDE), Image.Resampling.LANCZOS)
        for k, crop in enumerate(_crops(photo)):
            rows.append(
                make_row(
                    image_id=make_image_id("stock_negatives", path.name, k),
                    instance_id=f"{category}_negatives",
                    category=category,
                    role="negative",
                    source="pretrained",
                    image=crop,
                )
            )
    return rows_to_table(rows) if rows else IMAGE_SCHEMA.empty_table()
