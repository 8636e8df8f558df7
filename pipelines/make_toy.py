"""``personalize make-toy --out DIR [--seed N] [--size N]``: write the toy PODS-layout benchmark.

The toy benchmark (see ``personalization.datasets.toy``) stands in for PODS on machines without it: 4 categories of
procedurally drawn objects whose instances differ only in fine detail. Then::

    personalize ingest data.root=DIR output_dir=outputs/toy
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from personalization.datasets import DatasetError, make_toy
from personalization.datasets.toy import TOY_CATEGORIES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="personalize make-toy", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (empty, or an earlier toy benchmark)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--categories", default=",".join(TOY_CATEGORIES), help="comma-separated toy categories")
    parser.add_argument("--val-per-category", type=int, default=2)
    parser.add_argument("--test-per-category", type=int, default=3)
    parser.add_argument("--test-per-split", type=int, default=4, help="test images per instance and test split")
    parser.add_argument("--dense-per-instance", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        out = make_toy(
            args.out,
            seed=args.seed,
            size=args.size,
            categories=[c for c in args.categories.split(",") if c],
            val_per_category=args.val_per_category,
            test_per_category=args.test_per_category,
            test_per_split=args.test_per_split,
            dense_per_instance=args.dense_per_instance,
        )
    except DatasetError as error:
        parser.exit(2, f"personalize make-toy: {error}\n")
    info = json.loads((out / "pods_info.json").read_text())
    splits = list(info["class_to_split"].values())
    categories = len(set(info["class_to_sc"].values()))
    images = {folder: sum(1 for _ in (out / folder).glob("*/*")) for folder in ("train", "test", "test_dense")}
    print(
        f"make-toy: wrote {out} (PODS layout): {len(info['classes'])} instances in {categories} categories "
        f"({splits.count('val')} val, {splits.count('test')} test); {images['train']} train, {images['test']} test, "
        f"{images['test_dense']} dense images of {args.size} px"
    )
    print(f"next: personalize ingest data.root={out} output_dir=outputs/toy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
