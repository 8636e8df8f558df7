"""A tiny ``OUT/ingest`` (random photos, optional masks) for stage tests that need no real dataset.

Importable from every test module: ``tests/`` is on ``sys.path`` through its ``conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from personalization.schema import make_row, write_image_table


def write_ingest(
    out: Path, instances: dict[str, str], *, photos: int = 2, size: int = 32, mask: str | None = "box", seed: int = 0
) -> dict[str, list[Image.Image]]:
    """``out/ingest/{images.parquet, instances.json}`` for ``instances`` ({instance_id: category}, all `test`).

    ``mask``: "box" (the centre half), "full" (every pixel) or None (mask-less photos). Returns the photos.
    """
    rng = np.random.default_rng(seed)
    masks = {"box": np.zeros((size, size), bool), "full": np.ones((size, size), bool), None: None}
    masks["box"][size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    rows, made = [], {}
    for instance_id, category in instances.items():
        made[instance_id] = [
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(photos)
        ]
        rows += [
            make_row(
                image_id=f"{instance_id}-{k}", instance_id=instance_id, category=category, role="real_train",
                source="real", split="train", instance_split="test", image=image, mask=masks[mask],
            )
            for k, image in enumerate(made[instance_id])
        ]  # fmt: skip
    (out / "ingest").mkdir(parents=True, exist_ok=True)
    write_image_table(rows, out / "ingest" / "images.parquet")
    (out / "ingest" / "instances.json").write_text(
        json.dumps({i: {"category": c, "split": "test"} for i, c in instances.items()})
    )
    return made
