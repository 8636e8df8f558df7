"""DreamBooth: personalize Stable Diffusion on an instance's few photos (plain PyTorch + diffusers).

Recipe (REFERENCE.md, stage 1): instance prompt ``a photo of <new1> {category}``; prior preservation with class
images from the *pretrained* generator under ``a photo of {category}``; the masked variant weights the denoising
loss by the object mask on the latent grid; full fine-tune of UNet + text encoder, or LoRA on the UNet.

Loss for one step, with latents z0 (B, 4, h, w), noise e, timestep t, prediction p = unet(z_t, t, text):
    instance: mean((w * p - w * e)^2),  w = (m + 0.01) / max(m + 0.01),  m = mask resized (nearest) to (h, w)
    prior:    mean((p_c - e_c)^2)       (unmasked, on the class images)
    total = instance + prior_weight * prior
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from personalization.errors import UserError
from personalization.synthesis.prompts import TOKEN

log = logging.getLogger(__name__)
MASK_FLOOR = 0.01


PERSONALIZED_FILE = "personalized_generator.json"  # full mode: {base_model, components, dtype}


class DreamboothError(UserError):
    """Bad DreamBooth input; the message names what is wrong and the fix."""


def instance_prompt(category: str) -> str:
    return f"a photo of {TOKEN} {category}"


def class_prompt(category: str) -> str:
    return f"a photo of {category}"


def check_generator_dir(path: str | Path) -> Path:
    """A local diffusers folder must hold ``model_index.json``; HF ids are left to ``from_pretrained``."""
    path = Path(path)
    looks_local = path.exists() or str(path).startswith((".", "/", "~"))
    if looks_local and not (path / "model_index.json").is_file():
        raise DreamboothError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); point it at a folder saved by "
            "StableDiffusionPipeline.save_pretrained or an HF id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    return path


def compute_loss_weight(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool/float masks -> (B, 1, h, w) weights ``(m + 0.01) / max``, resized nearest to the latents."""
    m = F.interpolate(masks[:, None].float(), size=latent_hw, mode="nearest")
    w = m + MASK_FLOOR
    return w / w.amax(dim=(1, 2, 3), keepdim=True)


def compute_masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``mean((w * pred - w * target)^2)`` over (B, C, h, w); plain MSE when ``weight`` is None."""
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    return F.mse_loss(pred.float() * weight, target.float() * weight)


def _to_pixels(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> (B, 3, R, R) in [-1, 1]: resize the short side to R, center crop."""
    out = []
    for image in images:
        out.append(np.asarray(_square(image.convert("RGB"), resolution, Image.BICUBIC), dtype=np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _to_masks(masks: Sequence[np.ndarray], resolution: int) -> torch.Tensor:
    """(H, W) bool masks -> (B, R, R) float with the same resize + crop as the images."""
    out = [
        np.asarray(_square(Image.fromarray(np.asarray(m, bool).astype(np.uint8) * 255), resolution, Image.NEAREST))
        > 127
        for m in masks
    ]
    return torch.from_numpy(np.stack(out)).float()


def _square(image: Image.Image, size: int, resample: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), resample)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def generate_class_images(
    base_model: str | Path,
    category: str,
    n: int,
    *,
    resolution: int = 512,
    steps: int = 25,
    seed: int = 0,
    batch_size: int = 4,
    device: str | None = None,
) -> list[Image.Image]:
    """``n`` images of ``a photo of {category}`` from the pretrained generator (seeds ``seed .. seed+n-1``)."""
    from diffusers import StableDiffusionPipeline

    dev = _device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(check_generator_dir(base_model), dtype=dtype).to(dev)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for start in range(0, n, batch_size):
        seeds = range(seed + start, seed + min(n, start + batch_size))
        generators = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        out = pipe(
            [class_prompt(category)] * len(generators),
            num_inference_steps=steps,
            height=resolution,
            width=resolution,
            generator=generators,
        )
        images.extend(out.images)
    return images


def _optimizer(params: list, learning_rate: float, use_8bit_adam: bool, device: torch.device):
    if use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb  # optional: only where it is installed

            return bnb.optim.AdamW8bit(params, lr=learning_rate)
        except ImportError:
            log.info("bitsandbytes not installed: using torch AdamW")
    return torch.optim.AdamW(params, lr=learning_rate)


def train_dreambooth(
    base_model: str | Path,
    images: Sequence[Image.Image],
    category: str,
    out_dir: str | Path,
    *,
    masks: Sequence[np.ndarray] | None = None,
    masked: bool = False,
    class_images: Sequence[Image.Image] = (),
    prior_weight: float = 1.0,
    mode: str = "full",
    steps: int = 400,
    learning_rate: float = 2e-6,
    batch_size: int = 1,
    resolution: int = 512,
    train_text_encoder: bool = True,
    lora_rank: int = 16,
    gradient_checkpointing: bool = True,
    mixed_precision: str = "fp16",
    use_8bit_adam: bool = True,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Fine-tune ``base_model`` on ``images`` and save the result in ``out_dir``.

    mode="full": UNet (+ text encoder when ``train_text_encoder``) trained and saved in half precision beside a
    reference to ``base_model`` (:func:`load_personalized_pipeline`). mode="lora": a LoRA of rank ``lora_rank``
    on the UNet attention, saved as ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(out_dir)``); the text
    encoder stays frozen in LoRA mode. Mixed precision (autocast, fp16 with a grad scaler) and 8-bit Adam
    (bitsandbytes, when importable) apply on CUDA only; CPU runs in fp32 with torch AdamW.
    Returns ``{"losses": [...], "mode": mode, "path": str(out_dir)}``.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if mode not in ("full", "lora"):
        raise DreamboothError(f"mode={mode!r}: use 'full' or 'lora'")
    if not images:
        raise DreamboothError("train_dreambooth: no instance images given")
    if masked and (masks is None or len(masks) != len(images) or any(m is None for m in masks)):
        raise DreamboothError("masked DreamBooth needs one mask per instance image; give masks or set masked=False")
    dev = _device(device)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision) if dev.type == "cuda" else None
    torch.manual_seed(seed)

    pipe = StableDiffusionPipeline.from_pretrained(check_generator_dir(base_model), safety_checker=None)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False).to(dev)
    unet.to(dev)
    text_encoder.to(dev)
    tune_text = train_text_encoder and mode == "full"
    text_encoder.requires_grad_(tune_text)
    if mode == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if tune_text:
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)  # transformers >= 5 name
            (enable or text_encoder.gradient_checkpointing_enable)()
    params = [p for p in unet.parameters() if p.requires_grad]
    if tune_text:
        params += list(text_encoder.parameters())
    optimizer = _optimizer(params, learning_rate, use_8bit_adam, dev)
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None

    pixels = _to_pixels(images, resolution).to(dev)
    mask_pixels = _to_masks(masks, resolution).to(dev) if masked else None
    class_pixels = _to_pixels(class_images, resolution).to(dev) if class_images and prior_weight > 0 else None

    def encode_text(prompt: str, n: int) -> torch.Tensor:
        ids = tokenizer(
            [prompt] * n,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(dev)
        return text_encoder(ids)[0]

    rng = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train(tune_text)
    losses: list[float] = []
    for step in range(steps):
        pick = torch.randint(len(images), (batch_size,), generator=rng)
        batch = pixels[pick]
        weight_masks = mask_pixels[pick] if mask_pixels is not None else None
        n_class = 0
        if class_pixels is not None:
            batch = torch.cat([batch, class_pixels[torch.randint(len(class_pixels), (batch_size,), generator=rng)]])
            n_class = batch_size
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=dev)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            text = torch.cat(
                [encode_text(instance_prompt(category), batch_size)]
                + ([encode_text(class_prompt(category), n_class)] if n_class else [])
            )
            pred = unet(noisy, t, text).sample
            target = noise
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, t)
            weight = compute_loss_weight(weight_masks, latents.shape[-2:]) if weight_masks is not None else None
            loss = compute_masked_mse(pred[:batch_size], target[:batch_size], weight)
            if n_class:
                loss = loss + prior_weight * compute_masked_mse(pred[batch_size:], target[batch_size:], None)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"DreamBooth loss became {loss.item()} at step {step}; lower the learning rate")
        losses.append(float(loss.item()))
    save_dreambooth(pipe, out_dir, mode, base_model, ("unet", "text_encoder") if tune_text else ("unet",))
    return {"losses": losses, "mode": mode, "path": str(out_dir)}


def save_dreambooth(pipe, out_dir: str | Path, mode: str, base_model: str | Path = "", components=("unet",)) -> Path:
    """Save only what was trained; the frozen rest is referenced by ``base_model``, never copied.

    LoRA: the UNet adapter in the diffusers LoRA format (``pipe.load_lora_weights(out_dir)``). Full: each trained
    component (``unet``, ``text_encoder``) as a half-precision diffusers/transformers subfolder plus
    ``personalized_generator.json`` naming the base; :func:`load_personalized_pipeline` puts them together (about
    1.9 GB per object for SD 1.5 instead of a 4 GB fp32 copy of the whole pipeline).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    if mode == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
        return out_dir
    for name in components:
        getattr(pipe, name).to("cpu", torch.float16).save_pretrained(out_dir / name, safe_serialization=True)
    meta = {"base_model": str(base_model), "components": list(components), "dtype": "float16"}
    (out_dir / PERSONALIZED_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def is_personalized_folder(path: str | Path) -> bool:
    return (Path(path) / PERSONALIZED_FILE).is_file()


def load_personalized_pipeline(folder: str | Path, dtype: torch.dtype = torch.float32, **kwargs):
    """A full-mode DreamBooth output as a ``StableDiffusionPipeline``: the base model with the trained components
    of ``folder`` in place of its own."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    meta = json.loads((folder / PERSONALIZED_FILE).read_text())
    classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
    parts = {name: classes[name].from_pretrained(folder / name, dtype=dtype) for name in meta["components"]}
    try:
        base = check_generator_dir(meta["base_model"])
    except DreamboothError as error:
        raise DreamboothError(f"{folder}: its base model is gone ({error}); restore it or re-run dreambooth") from None
    return StableDiffusionPipeline.from_pretrained(base, dtype=dtype, **parts, **kwargs)
