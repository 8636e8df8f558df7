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

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from personalization.devices import pick_device
from personalization.synthesis.generators import AUTO, find_generator
from personalization.synthesis.prompts import TOKEN
from personalization.synthesis.saved_generator import DreamboothError, check_generator_dir, save_dreambooth

log = logging.getLogger(__name__)
MASK_FLOOR = 0.01


def instance_prompt(category: str) -> str:
    return f"a photo of {TOKEN} {category}"


def class_prompt(category: str) -> str:
    return f"a photo of {category}"


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
    generator_type: str = AUTO,
) -> list[Image.Image]:
    """``n`` images of ``a photo of {category}`` from the pretrained generator (seeds ``seed .. seed+n-1``);
    ``generator_type``: a GENERATORS name, or auto (detected from ``base_model``)."""
    dev = pick_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    spec = find_generator(check_generator_dir(base_model), generator_type)
    pipe = spec.load_pipeline(Path(base_model), dtype=dtype).to(dev)
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
    """torch AdamW, or bitsandbytes' AdamW8bit (the reference's; a quarter of the optimizer memory) when asked.

    Asking for 8-bit Adam without bitsandbytes is an error, never a quiet fall back to fp32 AdamW. On a CPU it
    is ignored with a warning: its kernels (and its point, GPU memory) are CUDA's.
    """
    if not use_8bit_adam:
        return torch.optim.AdamW(params, lr=learning_rate)
    try:
        import bitsandbytes as bnb  # optional: the `gpu` extra of pyproject.toml
    except ImportError as error:
        raise DreamboothError(
            "use_8bit_adam=True needs bitsandbytes, which is not installed: pip install -e '.[gpu]' "
            "(bitsandbytes==0.50.2), or set dreambooth.use_8bit_adam=false"
        ) from error
    if device.type != "cuda":
        log.warning("8-bit Adam runs on CUDA only: using torch AdamW on %s", device)
        return torch.optim.AdamW(params, lr=learning_rate)
    return bnb.optim.AdamW8bit(params, lr=learning_rate)


@dataclass(frozen=True)
class DreamboothSettings:
    """How one DreamBooth run trains; :meth:`from_config` takes them from the ``dreambooth`` config section.

    mode="full": UNet (+ the text encoders when ``train_text_encoder``) trained and saved in half precision beside
    a reference to the base model (:func:`load_personalized_pipeline`). mode="lora": a LoRA of rank ``lora_rank``
    on the UNet attention, saved as ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(out_dir)``);
    the text encoders stay frozen in LoRA mode. ``masked``: weight the instance loss by the photos' masks.
    Mixed precision (autocast, fp16 with a grad scaler) and 8-bit Adam (``use_8bit_adam``: bitsandbytes, an error
    when it is not installed) apply on CUDA only; CPU runs in fp32 with torch AdamW. ``generator_type``: a GENERATORS
    name, or auto (detected from the base model). ``device``: None = CUDA when there is one.
    """

    mode: str = "full"
    steps: int = 400
    learning_rate: float = 2e-6
    batch_size: int = 1
    resolution: int = 512
    masked: bool = False
    prior_weight: float = 1.0
    train_text_encoder: bool = True
    lora_rank: int = 16
    gradient_checkpointing: bool = True
    mixed_precision: str = "fp16"
    use_8bit_adam: bool = False
    seed: int = 0
    generator_type: str = AUTO
    device: str | None = None

    @classmethod
    def from_config(cls, section, seed: int = 0, **changes) -> DreamboothSettings:
        """From a ``DreamboothConfig`` (its learning rate resolved for the mode), plus ``changes``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"learning_rate", "seed", "device"}
        values = {name: getattr(section, name) for name in names}
        return cls(**values, learning_rate=section.effective_learning_rate, seed=seed).replace(**changes)

    def replace(self, **changes) -> DreamboothSettings:
        return dataclasses.replace(self, **changes)


class DreamboothRun:
    """One DreamBooth fine-tune, in three parts: set up (``__init__``), :meth:`step`, :meth:`save`; plus
    :meth:`state_dict` / :meth:`load_state_dict` so a run killed mid-way resumes from a checkpoint, step for step.
    ``settings`` (:class:`DreamboothSettings`) say how; ``settings.steps`` is left to the caller's loop.
    """

    def __init__(
        self,
        base_model: str | Path,
        images: Sequence[Image.Image],
        category: str,
        settings: DreamboothSettings = DreamboothSettings(),
        *,
        masks: Sequence[np.ndarray] | None = None,
        class_images: Sequence[Image.Image] = (),
    ):
        s = self.settings = settings
        if s.mode not in ("full", "lora"):
            raise DreamboothError(f"mode={s.mode!r}: use 'full' or 'lora'")
        if not images:
            raise DreamboothError("train_dreambooth: no instance images given")
        if s.masked and (masks is None or len(masks) != len(images) or any(m is None for m in masks)):
            raise DreamboothError("masked DreamBooth needs one mask per instance image; give masks or set masked=False")
        self.base_model, self.category, self.mode, self.batch_size = base_model, category, s.mode, s.batch_size
        self.prior_weight, self.n_images = s.prior_weight, len(images)
        dev = self.device = pick_device(s.device)
        amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.mixed_precision)
        self.amp = amp if dev.type == "cuda" else None
        torch.manual_seed(s.seed)
        self.spec = find_generator(check_generator_dir(base_model), s.generator_type)
        self.pipe = self.spec.load_pipeline(Path(base_model), **self.spec.no_safety_checker)
        self.tune_text = s.train_text_encoder and s.mode == "full"
        self._set_up_models()
        self.trainable = {"unet": self.pipe.unet} | (self.text_encoders if self.tune_text else {})
        params = [p for module in self.trainable.values() for p in module.parameters() if p.requires_grad]
        self.optimizer = _optimizer(params, s.learning_rate, s.use_8bit_adam, dev)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp is torch.float16 else None
        self.pixels = _to_pixels(images, s.resolution).to(dev)
        self.mask_pixels = _to_masks(masks, s.resolution).to(dev) if s.masked else None
        use_prior = class_images and s.prior_weight > 0
        self.class_pixels = _to_pixels(class_images, s.resolution).to(dev) if use_prior else None
        self.rng = torch.Generator().manual_seed(s.seed)
        self.step_index, self.losses = 0, []
        self.pipe.unet.train()
        for encoder in self.text_encoders.values():
            encoder.train(self.tune_text)

    def _set_up_models(self) -> None:
        """Devices, what trains (UNet, its LoRA, the text encoders) and gradient checkpointing."""
        from diffusers import DDPMScheduler

        pipe, s, dev = self.pipe, self.settings, self.device
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe.vae.requires_grad_(False).to(dev)
        pipe.unet.to(dev)
        self.text_encoders = {name: getattr(pipe, name) for name in self.spec.text_encoders}
        for encoder in self.text_encoders.values():
            encoder.to(dev).requires_grad_(self.tune_text)
        if s.mode == "lora":
            from peft import LoraConfig

            pipe.unet.requires_grad_(False)
            pipe.unet.add_adapter(
                LoraConfig(
                    r=s.lora_rank,
                    lora_alpha=s.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(self.spec.lora_targets),
                )
            )
        if s.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders.values() if self.tune_text else ():
                enable = getattr(encoder, "activation_checkpointing_enable", None)  # transformers >= 5
                (enable or encoder.gradient_checkpointing_enable)()

    def _conditioning(self, size: int, n_class: int) -> dict:
        """The UNet's keyword arguments for ``size`` instance prompts followed by ``n_class`` class prompts."""
        spec, resolution = self.spec, self.settings.resolution
        prompts = [[instance_prompt(self.category)] * size]
        if n_class:
            prompts.append([class_prompt(self.category)] * n_class)
        return _concat([spec.unet_conditioning(self.pipe, p, self.device, resolution) for p in prompts])

    def step(self) -> float:
        """One optimisation step; returns its loss."""
        dev, size = self.device, self.batch_size
        pick = torch.randint(self.n_images, (size,), generator=self.rng)
        batch = self.pixels[pick]
        weight_masks = self.mask_pixels[pick] if self.mask_pixels is not None else None
        n_class = 0
        if self.class_pixels is not None:
            extra = self.class_pixels[torch.randint(len(self.class_pixels), (size,), generator=self.rng)]
            batch, n_class = torch.cat([batch, extra]), size
        with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None):
            with torch.no_grad():
                vae = self.pipe.vae
                latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            steps = self.noise_scheduler.config.num_train_timesteps
            t = torch.randint(0, steps, (latents.shape[0],), device=dev)
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            pred = self.pipe.unet(noisy, t, **self._conditioning(size, n_class)).sample
            target = noise
            if self.noise_scheduler.config.prediction_type == "v_prediction":
                target = self.noise_scheduler.get_velocity(latents, noise, t)
            weight = compute_loss_weight(weight_masks, latents.shape[-2:]) if weight_masks is not None else None
            loss = compute_masked_mse(pred[:size], target[:size], weight)
            if n_class:
                loss = loss + self.prior_weight * compute_masked_mse(pred[size:], target[size:], None)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"DreamBooth loss became {loss.item()} at step {self.step_index}; lower the learning rate"
            )
        self.step_index += 1
        self.losses.append(float(loss.item()))
        return self.losses[-1]

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue as if never stopped: trained weights only, optimizer,
        step, losses and the random states."""
        weights = {
            name: {k: v for k, v in module.state_dict().items() if not self._frozen(module, k)}
            for name, module in self.trainable.items()
        }
        return {
            "weights": weights,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step_index,
            "losses": list(self.losses),
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }

    def _frozen(self, module: torch.nn.Module, key: str) -> bool:
        return self.mode == "lora" and module is self.pipe.unet and "lora" not in key

    def load_state_dict(self, state: dict) -> None:
        for name, weights in state["weights"].items():
            self.trainable[name].load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step_index, self.losses = state["step"], list(state["losses"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save(self, out_dir: str | Path) -> Path:
        return save_dreambooth(self.pipe, out_dir, self.mode, self.base_model, tuple(self.trainable), self.spec)


def _concat(parts: list[dict]) -> dict:
    """Dicts of (N, ...) tensors (or of such dicts) joined along the batch, key by key."""
    first = parts[0]
    return {
        key: _concat([p[key] for p in parts]) if isinstance(first[key], dict) else torch.cat([p[key] for p in parts])
        for key in first
    }


def train_dreambooth(
    base_model: str | Path,
    images: Sequence[Image.Image],
    category: str,
    out_dir: str | Path,
    settings: DreamboothSettings | None = None,
    *,
    masks: Sequence[np.ndarray] | None = None,
    class_images: Sequence[Image.Image] = (),
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    **changes,
) -> dict:
    """Fine-tune ``base_model`` on ``images`` for ``settings.steps`` steps and save the result in ``out_dir``.

    ``settings``: a :class:`DreamboothSettings` (default: its defaults), with ``changes`` (its field names) on top.
    Every ``checkpoint_every`` steps ``on_checkpoint(state)`` gets the run's :meth:`DreamboothRun.state_dict`;
    ``resume`` (such a state) continues from it. Returns ``{"losses": [...], "mode": mode, "path": str(out_dir)}``.
    """
    settings = (settings or DreamboothSettings()).replace(**changes)
    run = DreamboothRun(base_model, images, category, settings, masks=masks, class_images=class_images)
    if resume is not None:
        run.load_state_dict(resume)
    while run.step_index < settings.steps:
        run.step()
        if on_checkpoint is not None and checkpoint_every and run.step_index % checkpoint_every == 0:
            on_checkpoint(run.state_dict())
    run.save(out_dir)
    return {"losses": run.losses, "mode": run.mode, "path": str(out_dir)}
