"""A tiny random Stable Diffusion 1.5-shaped pipeline, saved in the real diffusers layout.

Same classes as SD 1.5 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer, a DPM-Solver
scheduler), only far smaller: the VAE downsamples by 2 (not 8) so a 32 px image has a 16x16 latent, the UNet has
two blocks of 32/64 channels and the text encoder two layers of width 32. Images it makes are noise; it exists so
DreamBooth, sampling and the Ray stages run through stock `StableDiffusionPipeline.from_pretrained` on a CPU.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

SD_DIRNAME = "tiny_stable_diffusion"
TEXT_WIDTH = 32


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for the raw bytes (GPT-2 / CLIP convention)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for byte in range(256):
        if byte in keep:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer():
    """A CLIP tokenizer over single bytes plus a few merges (enough to tokenize any English prompt)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    merges = [("p", "h"), ("o", "t"), ("ph", "ot"), ("n", "e"), ("ne", "w")]
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _build_components(seed: int) -> dict:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def build_stable_diffusion(out_dir: str | Path, seed: int = 0) -> Path:
    """Save the tiny pipeline under ``out_dir/tiny_stable_diffusion`` (cached: reused when already complete).

    Returns the folder, which stock ``StableDiffusionPipeline.from_pretrained(folder)`` loads.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(out_dir) / SD_DIRNAME
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline(
        **_build_components(seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    # Build beside the target and rename, so a crash never leaves a half-written folder that looks complete.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{SD_DIRNAME}.tmp-"))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        assert index["unet"][1] == "UNet2DConditionModel", index
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model_index.json").is_file():
            raise
    return folder
