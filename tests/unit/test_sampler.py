import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personalization.schema import make_image_id, rows_to_table
from personalization.synthesis.dreambooth import train_dreambooth
from personalization.synthesis.generation_rows import SamplerError, check_generator, image_id_for, make_generation_rows
from personalization.synthesis.sampler import ImageSampler
from personalization.zoo.diffusion import build_stable_diffusion

SIZE = 32


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return str(build_stable_diffusion(tmp_path_factory.mktemp("zoo")))


@pytest.fixture(scope="module")
def loras(sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    rng = np.random.default_rng(1)
    out = []
    for name in ("a", "b"):
        images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
        train_dreambooth(
            sd_dir,
            images,
            "mug",
            root / name,
            mode="lora",
            steps=1,
            learning_rate=5e-2,
            resolution=SIZE,
            lora_rank=4,
            seed=len(out),
        )
        out.append(str(root / name))
    return out


def _batch(rows):
    return {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}


def _pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)))


def test_rows_to_image_columns(sd_dir):
    rows = make_generation_rows(
        "mug_1",
        "mug",
        ["a <new1> mug", "a <new1> mug on grass"],
        3,
        generator=sd_dir,
        cfg=5.0,
        seed=10,
        role="negative",
        source="pretrained",
    )
    assert [r["seed"] for r in rows] == [10, 11, 12]
    assert [r["prompt"] for r in rows] == ["a <new1> mug", "a <new1> mug on grass", "a <new1> mug"]
    sampler = ImageSampler(sd_dir, steps=2, image_size=SIZE)
    out = sampler(_batch(rows))
    table = rows_to_table([{k: out[k][i] for k in out} for i in range(3)])  # matches the image-table schema
    assert table.num_rows == 3
    # The id names the generator by folder name, not absolute path: moving the output folder keeps every id.
    key = f"local:{Path(sd_dir).name}"
    assert out["image_id"][0] == make_image_id("generated", key, "a <new1> mug", 10, 5.0, 2, SIZE)
    assert len(set(out["image_id"])) == 3
    assert out["image"].dtype == object and isinstance(out["image"][0], bytes)
    assert _pixels(out["image"][0]).shape == (SIZE, SIZE, 3)
    assert list(out["role"]) == ["negative"] * 3 and list(out["source"]) == ["pretrained"] * 3
    # An image depends on its own row only, not on the batch it was generated in.
    alone = sampler(_batch(rows[2:]))
    np.testing.assert_array_equal(_pixels(alone["image"][0]), _pixels(out["image"][2]))
    assert not np.array_equal(_pixels(out["image"][0]), _pixels(out["image"][2]))  # other seed, other image


def test_lora_generators_swap_without_reloading(sd_dir, loras):
    sampler = ImageSampler(sd_dir, steps=2, image_size=SIZE)
    rows = []
    for generator in (loras[0], loras[1], sd_dir, loras[0]):
        rows += make_generation_rows("mug_1", "mug", ["a photo of <new1> mug"], 1, generator=generator, cfg=3.0)
    out = sampler(_batch(rows))
    assert sampler.loads == 1
    images = [_pixels(png) for png in out["image"]]
    np.testing.assert_array_equal(images[0], images[3])  # same adapter, same seed -> same image
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])
    base_only = ImageSampler(sd_dir, steps=2, image_size=SIZE)(_batch(rows[2:3]))
    np.testing.assert_array_equal(images[2], _pixels(base_only["image"][0]))  # adapters disabled for the base


def test_bad_generator_and_cfg(sd_dir, tmp_path):
    with pytest.raises(SamplerError, match="neither a diffusers folder"):
        check_generator(str(tmp_path))
    with pytest.raises(SamplerError, match="cfg"):
        make_generation_rows("m", "mug", ["a <new1> mug"], 1, generator=sd_dir, cfg=0.5)


def test_image_ids_survive_moving_the_output_folder(tmp_path):
    """A personalized generator is named by its manifest hash, so ids stay the same after the folder moves."""
    from personalization.artifacts import commit_stage

    first = tmp_path / "a" / "dreambooth" / "mug_1"
    commit_stage(first, "dreambooth", {"steps": 1}, lambda tmp: (tmp / "pytorch_lora_weights.safetensors").touch())
    moved = tmp_path / "b" / "dreambooth" / "mug_1"
    shutil.copytree(first.parent.parent, moved.parent.parent)
    ids = [image_id_for(str(folder), "a <new1> mug", 3, 5.0, 2, 32) for folder in (first, moved)]
    assert ids[0] == ids[1]
    assert ids[0] != image_id_for(str(first), "a <new1> mug", 4, 5.0, 2, 32)
