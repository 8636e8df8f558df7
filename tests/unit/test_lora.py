"""LoRA on the encoder: what trains, what stays frozen, and adapter round trips through stock peft."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from personalization.config import ConfigError, ModelConfig
from personalization.models import Encoder, apply_lora, build_encoder, load_adapter, load_backbone, save_adapter

NAMES = {"dinov2": "dinov2_vitb14", "clip": "clip_vitb16", "mae": "mae_vitb16"}


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return tiny_zoo(list(NAMES))


def vit_cfg(zoo, part, **changes):
    return ModelConfig(backbone=NAMES[part], weights=str(zoo[part]), image_size=32, **changes)


def train_a_few_steps(encoder, pixels, steps=3):
    """Pull the features of the batch towards each other (any loss that moves the adapter will do)."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    encoder.train()
    for _ in range(steps):
        features = encoder(pixels)
        loss = -(features @ features.T).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder.eval()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("part", list(NAMES))
def test_lora_targets_the_attention_projections(zoo, part):
    encoder = apply_lora(build_encoder(vit_cfg(zoo, part)), vit_cfg(zoo, part))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in encoder.base_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj"}
    assert sum(hasattr(m, "lora_A") for m in encoder.base_model.modules()) == 3 * 2  # q/k/v x 2 layers
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    config = encoder.backbone.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (16, 0.5, 0.3, "none")


def test_lora_round_trip_through_stock_peft(zoo, tmp_path):
    cfg = vit_cfg(zoo, "dinov2")
    encoder = apply_lora(build_encoder(cfg), cfg)
    base_before = {k: v for k, v in snapshot(encoder.base_model).items() if "lora_" not in k}
    pixels = torch.randn(4, 3, 28, 42)
    with torch.no_grad():
        pretrained = build_encoder(cfg)(pixels)
    train_a_few_steps(encoder, pixels)

    # Base weights untouched; the adapter moved the features.
    after = snapshot(encoder.base_model)
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    with torch.no_grad():
        trained = encoder(pixels)
        assert torch.equal(trained, encoder(pixels))  # eval mode: no LoRA dropout
    assert not torch.allclose(trained, pretrained, atol=1e-4)
    encoder.train()
    with torch.no_grad():
        assert not torch.equal(encoder(pixels), encoder(pixels))  # train mode: dropout 0.3 is live
    encoder.eval()

    out = save_adapter(encoder, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)  # adapter only, no base weights
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(zoo["dinov2"])

    # Stock peft onto a fresh bare backbone, wrapped by a plain Encoder.
    stock = Encoder(encoder.spec, PeftModel.from_pretrained(load_backbone(encoder.spec, cfg.weights), str(out)))
    # And through this package.
    ours = load_adapter(build_encoder(cfg), out)
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(pixels), trained)
        torch.testing.assert_close(ours(pixels), trained)
        torch.testing.assert_close(ours.dense(pixels), encoder.dense(pixels))


def test_mobilenet_conv_lora_keeps_frozen_batchnorm_statistics(tmp_path):
    cfg = ModelConfig(backbone="mobilenetv2", image_size=64)
    encoder = apply_lora(build_encoder(cfg), cfg)
    wrapped = sorted(n for n, m in encoder.base_model.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == sorted(encoder.spec.lora_targets)
    assert all(isinstance(encoder.base_model.get_submodule(n).base_layer, torch.nn.Conv2d) for n in wrapped)
    before = snapshot(encoder.base_model)
    pixels = torch.randn(4, 3, 64, 64)
    train_a_few_steps(encoder, pixels)
    batchnorms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in encoder.train().modules() if isinstance(m, torch.nn.BatchNorm2d))
    after = snapshot(encoder.base_model)
    assert all(torch.equal(after[k], v) for k, v in before.items() if "lora_" not in k)  # running stats included
    assert batchnorms

    out = save_adapter(encoder.eval(), tmp_path / "adapter")
    stock = Encoder(encoder.spec, PeftModel.from_pretrained(load_backbone(encoder.spec), str(out))).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(pixels), encoder(pixels))


def test_mobilenet_full_blocks_train_and_round_trip(tmp_path):
    cfg = ModelConfig(backbone="mobilenetv2", image_size=64, train_blocks=2)
    encoder = apply_lora(build_encoder(cfg), cfg)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert any("features.17.modules_to_save" in n for n in trainable)
    assert any("features.18.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    # LoRA targets inside the two full blocks are dropped; those before them stay.
    wrapped = sorted(n for n, m in encoder.base_model.named_modules() if hasattr(m, "lora_A"))
    assert wrapped and all(n.startswith(("features.14.", "features.15.", "features.16.")) for n in wrapped)
    assert encoder.base_model.features[17].modules_to_save["default"].conv[1][1].training  # its BN trains

    pixels = torch.randn(4, 3, 64, 64)
    train_a_few_steps(encoder, pixels)
    out = save_adapter(encoder, tmp_path / "adapter")
    stock = Encoder(encoder.spec, PeftModel.from_pretrained(load_backbone(encoder.spec), str(out))).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(pixels), encoder(pixels))


def test_bad_lora_settings_fail_early(zoo):
    cfg = ModelConfig(backbone="mobilenetv2", train_blocks=5)  # covers every default LoRA target
    with pytest.raises(ConfigError, match="model.lora_targets"):
        apply_lora(build_encoder(cfg), cfg)
    cfg = vit_cfg(zoo, "mae", lora_targets=("query",))
    with pytest.raises(ConfigError, match="none of \\['query'\\]"):
        apply_lora(build_encoder(cfg), cfg)
    with pytest.raises(ConfigError, match="has 2 blocks"):
        apply_lora(build_encoder(vit_cfg(zoo, "clip", train_blocks=3)), vit_cfg(zoo, "clip", train_blocks=3))
    encoder = build_encoder(vit_cfg(zoo, "clip"))
    with pytest.raises(ValueError, match="no adapter"):
        save_adapter(encoder, "unused")
