"""The GENERATORS table: an entry registered with the real diffusers classes round-trips through DreamBooth and the
sampler on the tiny zoo Stable Diffusion, and the base model's family is detected from its model_index.json."""

import json

import numpy as np
import pytest
import safetensors.torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from personalization.config import ConfigError, load_config
from personalization.synthesis.dreambooth import train_dreambooth
from personalization.synthesis.generators import GENERATORS, GeneratorError, GeneratorSpec, find_generator
from personalization.synthesis.sampler import ImageSampler
from personalization.zoo.diffusion import build_stable_diffusion

SIZE = 32


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return str(build_stable_diffusion(tmp_path_factory.mktemp("zoo")))


class CountingSpec(GeneratorSpec):
    """SD 1.5's conditioning, counting the prompts it encodes: proof that DreamBooth asks the spec."""

    encoded: list = []

    def unet_conditioning(self, pipe, prompts, device, resolution):
        self.encoded.append((list(prompts), resolution))
        return super().unet_conditioning(pipe, prompts, device, resolution)


def test_the_zoo_stable_diffusion_and_its_outputs_are_detected_as_sd15(sd_dir, tmp_path):
    assert json.loads(open(f"{sd_dir}/model_index.json").read())["_class_name"] == "StableDiffusionPipeline"
    assert find_generator(sd_dir) is GENERATORS["sd15"]
    assert find_generator(sd_dir, "sd15") is GENERATORS["sd15"]
    full = tmp_path / "full_output"  # a full-mode DreamBooth output: the family of the base it names
    full.mkdir()
    (full / "personalized_generator.json").write_text(json.dumps({"base_model": sd_dir, "components": ["unet"]}))
    assert find_generator(full) is GENERATORS["sd15"]
    # A hub id that is not in the local cache has no model_index.json to read: the default, SD 1.5.
    assert find_generator("nobody/not-a-cached-model") is GENERATORS["sd15"]


def test_unknown_families_and_names_fail_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="dreambooth.generator_type: 'sdxl' is not registered; use auto or one of"):
        load_config(None, ["dreambooth.generator_type=sdxl"])
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(GeneratorError, match="'KandinskyPipeline' matches no registered generator type.*=<name>"):
        find_generator(tmp_path)
    with pytest.raises(GeneratorError, match=r"'sdxl' is not a registered generator type.*\['sd15'\]"):
        find_generator(tmp_path, "sdxl")


def test_a_registered_generator_round_trips_through_dreambooth_and_the_sampler(sd_dir, tmp_path, monkeypatch):
    spec = CountingSpec(
        name="tiny",
        pipeline=StableDiffusionPipeline,  # the class itself, not its name
        class_names=("TinyPipeline",),
        no_safety_checker={"safety_checker": None, "requires_safety_checker": False},
        lora_targets=("to_q", "to_v"),
    )
    monkeypatch.setitem(GENERATORS, "tiny", spec)
    monkeypatch.setattr(CountingSpec, "encoded", [])
    assert find_generator(sd_dir, "tiny") is spec
    detected = tmp_path / "tiny_family"
    detected.mkdir()
    (detected / "model_index.json").write_text(json.dumps({"_class_name": "TinyPipeline"}))
    assert find_generator(detected) is spec

    photos = [Image.fromarray(np.full((SIZE, SIZE, 3), 60 * k, np.uint8)) for k in range(2)]
    lora = tmp_path / "lora"
    result = train_dreambooth(
        sd_dir, photos, "mug", lora, mode="lora", steps=1, learning_rate=1e-2, resolution=SIZE, lora_rank=4,
        generator_type="tiny",
    )  # fmt: skip
    assert len(result["losses"]) == 1 and np.isfinite(result["losses"][0])
    assert spec.encoded == [(["a photo of <new1> mug"], SIZE)]
    keys = safetensors.torch.load_file(lora / spec.lora_file).keys()
    assert keys and all(".to_q." in k or ".to_v." in k for k in keys)  # the spec's LoRA targets, nothing else

    sampler = ImageSampler(sd_dir, generator_type="tiny", steps=2, image_size=SIZE)
    assert sampler.spec is spec
    prompt = ["a photo of <new1> mug"]
    (image,) = sampler.generate(str(lora), prompt, [7], 5.0)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    # Same classes, same seed: the entry makes exactly what the built-in SD 1.5 entry makes.
    (reference,) = ImageSampler(sd_dir, steps=2, image_size=SIZE).generate(str(lora), prompt, [7], 5.0)
    np.testing.assert_array_equal(image, reference)
