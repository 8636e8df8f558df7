"""The GENERATORS table: an entry registered with the real diffusers classes round-trips through DreamBooth and the
sampler on the tiny zoo Stable Diffusion, and the base model's family is detected from its model_index.json."""

import json
from pathlib import Path

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


def _tiny_sdxl(folder):
    """A random SDXL-shaped pipeline (two CLIP text encoders, a text_time UNet) saved as stock diffusers does."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from personalization.zoo.diffusion import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size ids + the pooled text width
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(16, 32), latent_channels=4, norm_num_groups=16, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
    ).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.mark.slow
def test_the_docs_sdxl_example_runs_on_a_tiny_sdxl(tmp_path, monkeypatch):
    """docs/extending.md's SDXL block, as written there: one class and one entry make DreamBooth and sampling work."""
    from personalization.synthesis.dreambooth import generate_class_images

    section = (Path(__file__).parents[2] / "docs" / "extending.md").read_text().split("## A generator")[1]
    namespace = {"GeneratorSpec": GeneratorSpec, "GENERATORS": {}}
    exec(section.split("```python\n")[1].split("```")[0], namespace)
    monkeypatch.setitem(GENERATORS, "sdxl", namespace["GENERATORS"]["sdxl"])
    sdxl = str(_tiny_sdxl(tmp_path / "tiny_sdxl"))
    assert find_generator(sdxl) is GENERATORS["sdxl"]
    class_images = generate_class_images(sdxl, "mug", 1, resolution=SIZE, steps=2)
    photos = [Image.fromarray(np.full((SIZE, SIZE, 3), 60 * k, np.uint8)) for k in range(2)]
    saved = {}
    for mode in ("lora", "full"):
        result = train_dreambooth(
            sdxl, photos, "mug", tmp_path / mode, mode=mode, steps=1, learning_rate=1e-3, resolution=SIZE,
            lora_rank=4, class_images=class_images,
        )  # fmt: skip
        assert np.isfinite(result["losses"]).all()
        saved[mode] = sorted(p.name for p in (tmp_path / mode).iterdir())
    assert saved == {
        "lora": ["pytorch_lora_weights.safetensors"],
        "full": ["personalized_generator.json", "text_encoder", "text_encoder_2", "unet"],
    }
    sampler = ImageSampler(sdxl, steps=2, image_size=SIZE)
    images = [
        sampler.generate(g, ["a photo of <new1> mug"], [3], 5.0)[0] for g in (sdxl, *(str(tmp_path / m) for m in saved))
    ]
    assert all(image.shape == (SIZE, SIZE, 3) for image in images)
    assert not np.array_equal(images[0], images[2])  # the fine-tuned UNet and text encoders are the ones used
