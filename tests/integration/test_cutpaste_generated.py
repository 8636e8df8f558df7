"""`personalize cutpaste` with generated backgrounds (the paper's), on local Ray and the zoo's tiny Stable Diffusion:
sampled once from background prompts, committed as OUT/cutpaste/_backgrounds/, pasted onto, and reused by a later
run that adds an object."""

import numpy as np
import pytest
from PIL import Image, ImageFilter
from tiny_ingest import write_ingest

from personalization import schema
from personalization.artifacts import read_manifest
from personalization.config import build_config
from personalization.synthesis.prompts import make_background_prompts
from pipelines import cutpaste

SIZE = 32
SEED = 3
INSTANCES = {"mug_a": "mug", "mug_b": "mug", "mug_c": "mug"}


@pytest.fixture(scope="module")
def sd(tiny_zoo):
    return tiny_zoo(["stable_diffusion"])["stable_diffusion"]


def _config(out, sd, instances):
    return build_config(
        {
            "output_dir": str(out),
            "seed": SEED,
            "data": {"instances": instances},
            "dreambooth": {"base_model": str(sd)},
            "generate": {
                "enabled": True,
                "steps": 1,
                "image_size": SIZE,
                "batch_size": 2,
                "num_actors": 1,
                "gpus_per_actor": 0.0,
            },  # fmt: skip
            "filter": {"enabled": False},
            # cutpaste.backgrounds stays auto: generated, since generation is on
            "cutpaste": {"images_per_instance": 4, "image_size": SIZE, "num_backgrounds": 3, "scale_max": 0.5},
        }
    )


def _matched_background(row: dict, backgrounds: list[np.ndarray]) -> int:
    """The index of the background showing far from the pasted object (it must show there unchanged)."""
    pixels, mask = np.asarray(schema.decode_image(row["image"])).astype(int), schema.decode_mask(row["mask"])
    far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(7)))
    errors = [np.abs(pixels[far] - b[far]).max() for b in backgrounds]
    assert far.sum() > SIZE * SIZE // 2 and min(errors) <= 1, errors
    return int(np.argmin(errors))


def test_generated_backgrounds_are_made_once_pasted_onto_and_reused(ray_local, sd, tmp_path):
    out = tmp_path / "out"
    write_ingest(out, INSTANCES, size=SIZE, mask="box")
    cutpaste.run(_config(out, sd, ["mug_a", "mug_b"]))

    folder = out / "cutpaste" / "_backgrounds"
    manifest = read_manifest(folder)
    assert manifest["stage"] == "cutpaste/backgrounds" and manifest["rows"] == 3
    table = schema.read_image_table(folder).sort_by("seed")
    rows = table.to_pylist()
    assert [r["prompt"] for r in rows] == make_background_prompts(3, seed=SEED)  # the background prompts
    assert [r["seed"] for r in rows] == [SEED, SEED + 1, SEED + 2]
    assert {(r["role"], r["source"], r["generator"], r["width"]) for r in rows} == {
        ("background", "pretrained", str(sd), SIZE)
    }
    backgrounds = [np.asarray(schema.decode_image(r["image"])).astype(int) for r in rows]
    assert min(np.abs(a - b).mean() for a in backgrounds for b in backgrounds if a is not b) > 5  # distinct

    composites = schema.read_image_table(out / "cutpaste")  # the backgrounds' rows stay out of the composites
    assert composites.num_rows == 8 and set(composites["role"].to_pylist()) == {"positive"}
    used = {_matched_background(r, backgrounds) for r in composites.to_pylist()}
    assert len(used) >= 2  # composites drew from the set, not one image

    # Another object, in a later run: the backgrounds are reused untouched, the finished objects are skipped.
    files = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    done = {i: read_manifest(out / "cutpaste" / i) for i in ("mug_a", "mug_b")}
    cutpaste.run(_config(out, sd, ["mug_a", "mug_b", "mug_c"]))
    assert read_manifest(folder) == manifest and {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == files
    assert {i: read_manifest(out / "cutpaste" / i) for i in done} == done
    added = schema.read_image_table(out / "cutpaste" / "mug_c").to_pylist()
    assert len(added) == 4 and all(_matched_background(r, backgrounds) in range(3) for r in added)
