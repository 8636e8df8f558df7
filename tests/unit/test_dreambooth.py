import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from personalization.config import load_config
from personalization.synthesis.dreambooth import (
    DreamboothSettings,
    compute_loss_weight,
    compute_masked_mse,
    generate_class_images,
    train_dreambooth,
)
from personalization.synthesis.saved_generator import DreamboothError, check_generator_dir, load_personalized_pipeline
from personalization.zoo.diffusion import build_stable_diffusion

RES = 32


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return build_stable_diffusion(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    masks = []
    for _ in range(3):
        m = np.zeros((40, 48), bool)
        m[10:30, 12:36] = True
        masks.append(m)
    return images, masks


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None)


def _sample(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo of <new1> mug",
        num_inference_steps=2,
        height=RES,
        width=RES,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def test_zoo_pipeline_loads_with_stock_diffusers(sd_dir):
    pipe = _pipe(sd_dir)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.safety_checker is None
    images = _sample(pipe)
    assert images.shape == (1, RES, RES, 3)
    np.testing.assert_array_equal(images, _sample(pipe))  # seeded sampling is reproducible


@pytest.mark.slow
def test_full_finetune_changes_unet_and_text_encoder_and_loads(sd_dir, photos, tmp_path):
    images, masks = photos
    class_images = generate_class_images(sd_dir, "mug", 2, resolution=RES, steps=2)
    assert len(class_images) == 2 and class_images[0].size == (RES, RES)
    result = train_dreambooth(
        sd_dir,
        images,
        "mug",
        tmp_path / "db",
        masks=masks,
        masked=True,
        class_images=class_images,
        steps=3,
        learning_rate=1e-3,
        resolution=RES,
    )
    assert len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    # Only what was trained is saved, in half precision; the frozen VAE and tokenizer come from the base.
    saved = {p.name for p in (tmp_path / "db").iterdir()}
    assert saved == {"unet", "text_encoder", "personalized_generator.json"}
    weights = safetensors.torch.load_file(next((tmp_path / "db" / "unet").glob("*.safetensors")))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    base, tuned = _pipe(sd_dir), load_personalized_pipeline(tmp_path / "db")
    assert tuned.unet.dtype == torch.float32
    for name in ("unet", "text_encoder"):
        before = dict(getattr(base, name).named_parameters())
        after = dict(getattr(tuned, name).named_parameters())
        assert before.keys() == after.keys()
        changed = sum(not torch.equal(before[k], after[k]) for k in before)
        assert changed > len(before) // 2, f"{name}: only {changed} of {len(before)} tensors changed"
    assert torch.equal(base.vae.decoder.conv_out.weight, tuned.vae.decoder.conv_out.weight)  # VAE frozen


def test_lora_output_loads_with_load_lora_weights(sd_dir, photos, tmp_path):
    images, _ = photos
    train_dreambooth(
        sd_dir, images, "mug", tmp_path / "lora", mode="lora", steps=2, learning_rate=1e-2, resolution=RES, lora_rank=4
    )
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = _pipe(sd_dir)
    base_images = _sample(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    assert not np.allclose(base_images, _sample(pipe))


@pytest.mark.slow
def test_lora_default_learning_rate_moves_the_generator_where_the_full_rate_does_not(sd_dir, photos, tmp_path):
    """LoRA DreamBooth with the full fine-tune's 2e-6 barely changes a sample; the LoRA default (1e-4) does."""
    from personalization.config import DreamboothConfig

    images, _ = photos
    lora_rate = DreamboothConfig(mode="lora").effective_learning_rate
    assert (DreamboothConfig(mode="full").effective_learning_rate, lora_rate) == (2e-6, 1e-4)
    assert DreamboothConfig(mode="lora", learning_rate=3e-5).effective_learning_rate == 3e-5
    pipe = _pipe(sd_dir)
    base = _sample(pipe)
    shifts = {}
    for rate in (2e-6, lora_rate):
        out = tmp_path / f"lora-{rate}"
        train_dreambooth(sd_dir, images, "mug", out, mode="lora", steps=8, learning_rate=rate, resolution=RES)
        pipe = _pipe(sd_dir)
        pipe.load_lora_weights(out)
        shifts[rate] = float(np.abs(_sample(pipe) - base).mean())
    assert shifts[lora_rate] > 10 * shifts[2e-6], shifts


def test_low_acceptance_names_instances_whose_filter_rejects_nearly_everything():
    from personalization.filtering.scorer import low_acceptance

    seen = {"a": 200, "b": 200, "c": 10}
    accepted = {"a": 1, "b": 60, "c": 0}
    assert low_acceptance(seen, accepted) == {"a": 0.005}  # c: too few scored yet to judge


def test_masked_loss_ignores_background(sd_dir):
    """A target change outside the mask moves the UNet gradient by ~w_bg^2 = (0.01/1.01)^2; inside, by a lot."""
    unet = _pipe(sd_dir).unet
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    text = torch.randn(1, 77, 32)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    weight = compute_loss_weight(mask, (16, 16))
    assert weight.shape == (1, 1, 16, 16) and weight.max() == 1.0
    assert torch.allclose(weight[0, 0, 0, 0], torch.tensor(0.01 / 1.01))
    target = torch.randn(1, 4, 16, 16)
    background = torch.zeros_like(target)
    background[..., :2, :] = 5.0  # rows 0-1 of the latent grid lie outside the mask
    foreground = torch.zeros_like(target)
    foreground[..., 6:8, 6:10] = 5.0

    def grad(tgt, w):
        unet.zero_grad()
        compute_masked_mse(unet(latents, 10, text).sample, tgt, w).backward()
        return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])

    g0 = grad(target, weight)
    scale = g0.norm()
    assert (grad(target + background, weight) - g0).norm() < 1e-3 * scale
    assert (grad(target + foreground, weight) - g0).norm() > 1e-1 * scale
    g0_plain = grad(target, None)
    assert (grad(target + background, None) - g0_plain).norm() > 1e-1 * g0_plain.norm()


def test_bad_inputs_fail_early(sd_dir, photos, tmp_path):
    images, _ = photos
    with pytest.raises(DreamboothError, match="mask"):
        train_dreambooth(sd_dir, images, "mug", tmp_path / "x", masked=True, masks=None, steps=1, resolution=RES)
    (tmp_path / "not_sd").mkdir()
    with pytest.raises(DreamboothError, match="model_index.json"):
        check_generator_dir(tmp_path / "not_sd")
    with pytest.raises(DreamboothError, match="model_index.json"):
        train_dreambooth(tmp_path / "not_sd", images, "mug", tmp_path / "y", steps=1, resolution=RES)


def test_a_run_resumed_from_a_checkpoint_ends_like_an_uninterrupted_one(sd_dir, photos, tmp_path):
    """Stopped after 2 of 4 steps and resumed in a fresh process-like run: same losses, same adapter weights."""
    images, masks = photos
    settings = dict(mode="lora", learning_rate=1e-2, resolution=RES, lora_rank=4, masks=masks, masked=True)
    straight = train_dreambooth(sd_dir, images, "mug", tmp_path / "straight", steps=4, **settings)
    saved = []
    train_dreambooth(
        sd_dir, images, "mug", tmp_path / "first", steps=2, checkpoint_every=2, on_checkpoint=saved.append, **settings
    )
    path = tmp_path / "state.pt"
    torch.save(saved[-1], path)  # through the disk, as Ray Train's checkpoint does
    resumed = train_dreambooth(
        sd_dir, images, "mug", tmp_path / "resumed", steps=4, resume=torch.load(path, weights_only=True), **settings
    )
    assert resumed["losses"] == straight["losses"]
    a, b = (
        safetensors.torch.load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
        for name in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_settings_come_from_the_config_section_with_the_modes_learning_rate():
    overrides = ["dreambooth.mode=lora", "dreambooth.steps=7", "dreambooth.masked=false", "dreambooth.lora_rank=4"]
    settings = DreamboothSettings.from_config(load_config(None, overrides).dreambooth, seed=5)
    assert (settings.mode, settings.steps, settings.masked, settings.lora_rank) == ("lora", 7, False, 4)
    assert (settings.learning_rate, settings.seed, settings.generator_type, settings.device) == (1e-4, 5, "auto", None)
    assert settings.replace(device="cpu").device == "cpu"
    with pytest.raises(TypeError, match="stepz"):
        settings.replace(stepz=1)
