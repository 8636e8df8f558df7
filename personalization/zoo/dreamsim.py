"""A DreamSim cache folder with random weights that the real ``dreamsim`` 0.2.1 package loads offline.

``dreamsim(pretrained=True, cache_dir=DIR, dreamsim_type="clip_vitb32")`` skips its download when ``DIR`` holds
``clip_vitb32_pretrain.pth.tar`` (``{"state_dict": ...}`` of its DINO-style ViT-B/32, the CLIP 768x512 projection
under the key ``proj``, and the LayerNorm that replaces ``pos_drop``) and the peft adapter folder
``clip_vitb32_single_lora/``. We write exactly those, at the real ViT-B/32 size (about 88M parameters, 350 MB;
written once and reused), with a random LoRA so the adapter is not an identity. Real users point
``filter.cache_dir`` at a folder where the released checkpoint was unpacked instead.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

DREAMSIM_TYPE = "clip_vitb32"
CHECKPOINT = "clip_vitb32_pretrain.pth.tar"
ADAPTER = "clip_vitb32_single_lora"
LORA_TARGETS = ("qkv",)  # the fused attention projection of the DINO-style ViT blocks


def _write_backbone(folder: Path, seed: int) -> None:
    from dreamsim.feature_extraction.vision_transformer import vit_base

    torch.manual_seed(seed)
    vit = vit_base(patch_size=32)
    # dreamsim swaps pos_drop for CLIP's pre-LayerNorm before loading, so the checkpoint carries its weights.
    vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)
    state = vit.state_dict()
    state["proj"] = torch.randn(vit.embed_dim, 512) / vit.embed_dim**0.5
    torch.save({"state_dict": state}, folder / CHECKPOINT)


def _write_adapter(folder: Path, seed: int) -> None:
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    model = PerceptualModel(
        model_type=DREAMSIM_TYPE, feat_type="embedding", stride="32", lora=True, load_dir=str(folder), device="cpu"
    )
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=list(LORA_TARGETS))
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (an identity adapter); make it do something
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(str(folder / ADAPTER))


def build_dreamsim_cache(out_dir: str | Path, seed: int = 0) -> Path:
    """Write (once) a ``clip_vitb32`` DreamSim cache under ``out_dir/dreamsim`` and return that folder.

    Load it with ``dreamsim.dreamsim(pretrained=True, device="cpu", cache_dir=str(folder),
    dreamsim_type="clip_vitb32")``.
    """
    folder = Path(out_dir) / "dreamsim"
    if (folder / CHECKPOINT).is_file() and (folder / ADAPTER / "adapter_config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".dreamsim.tmp-"))
    try:
        _write_backbone(tmp, seed)
        _write_adapter(tmp, seed)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
