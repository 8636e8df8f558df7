"""The backbone tables round-trip: a new ``BACKBONES`` row of a known family, and a new ``FAMILIES`` adapter, are
built from a config, embedded with and wrapped by LoRA with no other change (tiny zoo DINOv2, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from personalization.config import ConfigError, build_config
from personalization.models import BACKBONES, BackboneSpec, apply_lora, build_encoder
from personalization.models.families import FAMILIES, QKV, Dinov2Family
from personalization.models.registry import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def dinov2(tiny_zoo):
    return tiny_zoo(["dinov2"])["dinov2"]


def small_dinov2(name: str, family: str = "dinov2", weights: str = "") -> BackboneSpec:
    """The docs' worked example (docs/extending.md, "A backbone in a known family")."""
    return BackboneSpec(
        name=name,
        family=family,
        default_weights=weights or "facebook/dinov2-small",
        patch_size=14,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize=256,
    )


def test_a_registered_backbone_of_a_known_family_builds_and_embeds(dinov2, monkeypatch):
    monkeypatch.setitem(BACKBONES, "dinov2_vits14", small_dinov2("dinov2_vits14", weights=str(dinov2)))
    cfg = build_config({"model": {"backbone": "dinov2_vits14", "image_size": 56}})  # the config accepts the row
    encoder = build_encoder(cfg.model)  # its default weights: the tiny zoo model
    reference = build_encoder(build_config({"model": {"weights": str(dinov2), "image_size": 56}}).model)
    assert encoder.spec.lora_targets == QKV and encoder.spec.blocks_prefix == "encoder.layer"  # family defaults
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert encoder.embed(pixels).shape == (2, 32) and encoder.dense(pixels).shape == (2, 4, 4, 32)
        for kind in ("cls", "cls+mean"):
            assert torch.equal(encoder.embed(pixels, kind), reference.embed(pixels, kind))
    wrapped = {
        n.rsplit(".", 1)[-1]
        for n, m in apply_lora(encoder, cfg.model).base_model.named_modules()
        if hasattr(m, "lora_A")
    }
    assert wrapped == set(QKV)


class PatchMeanDinov2(Dinov2Family):
    """A new family in one class: DINOv2 whose global token is the mean of its patch tokens."""

    def tokens(self, model, pixels, patch_size):
        _cls, grid = super().tokens(model, pixels, patch_size)
        return grid.mean(dim=(1, 2)), grid


def test_a_registered_family_decides_the_encoders_tokens(dinov2, monkeypatch):
    monkeypatch.setitem(FAMILIES, "dinov2_patchmean", PatchMeanDinov2())
    monkeypatch.setitem(BACKBONES, "patchmean", small_dinov2("patchmean", "dinov2_patchmean", str(dinov2)))
    encoder = build_encoder(build_config({"model": {"backbone": "patchmean", "image_size": 56}}).model)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        grid = encoder.tokens(pixels)[1]
        expected = F.normalize(grid.mean(dim=(1, 2)), dim=-1)
        torch.testing.assert_close(encoder.embed(pixels, "cls"), expected)
        half = F.normalize(torch.cat([grid.mean(dim=(1, 2))] * 2, dim=-1), dim=-1)
        torch.testing.assert_close(encoder(pixels), half)


def test_an_unknown_family_names_the_table_to_extend():
    with pytest.raises(
        ConfigError, match=r"'resnet' is unknown; use one of dinov2, clip, mae, mobilenetv2.*families\.py"
    ):
        small_dinov2("resnet50", family="resnet")
