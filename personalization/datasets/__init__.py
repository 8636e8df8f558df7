"""Real datasets -> the image table: PODS / Dogs / DF2 / plain-folder readers, safe image loading, and the toy
benchmark maker.

Typical use::

    rows, instances = read_dataset("data/pods")            # layout detected from pods_info.json
    rows, instances = read_dataset("my_mug/", category="mug")  # a plain folder of photos (+ masks/)
    make_toy("data/toy", seed=0)                             # a small PODS-layout benchmark drawn procedurally
"""

from personalization.datasets.images import DatasetError, load_image, load_mask
from personalization.datasets.layouts import LAYOUTS, TEST_SPLITS, DatasetScan, ImageEntry, detect_layout, scan_dataset
from personalization.datasets.reader import dataset_listing, hash_listing, iter_rows, load_entry, read_dataset
from personalization.datasets.toy import TOY_CATEGORIES, make_toy

__all__ = [
    "LAYOUTS",
    "TEST_SPLITS",
    "TOY_CATEGORIES",
    "DatasetError",
    "DatasetScan",
    "ImageEntry",
    "dataset_listing",
    "detect_layout",
    "hash_listing",
    "iter_rows",
    "load_entry",
    "load_image",
    "load_mask",
    "make_toy",
    "read_dataset",
    "scan_dataset",
]
