"""`gpu`: real-size cost on one CUDA device; prints "skipped: no CUDA" elsewhere.

- Peak: the card's measured bf16 matmul throughput (``torch.matmul`` of two 8192x8192 bf16 matrices).
- Generation: an SD 1.5-shaped ``UNet2DConditionModel`` (random weights, SD 1.5's config values written below),
  512 px images (64x64 latents), 50 denoising steps, classifier-free guidance (UNet batch = 2 x images), bf16,
  SDPA attention (diffusers' default processor), channels-last. images/s counts the 50 UNet calls per batch (the
  text encoder and VAE decode are excluded: under 5 % of SD sampling cost). Model FLOP utilisation (MFU) =
  FLOPs of one UNet call (``torch.utils.flop_counter.FlopCounterMode``) x calls / seconds / peak.
- Training: DINOv2 ViT-B/14 (random weights, the real config) + LoRA r16 on q/k/v through this project's
  ``Encoder`` / ``apply_lora``, InfoNCE, Adam, batch 16 triplets (48 images at 224 px), bf16 autocast; samples/s
  (triplets) and MFU from the FLOPs of one whole ``train_step`` (forward + backward).
Headline ratio: generation MFU (the issue's goals: generation >= 40 %, training >= 30 % of peak).
"""

from __future__ import annotations

import time

from benchmarks.common import Result

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}
DINOV2_VITB14 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "patch_size": 14, "image_size": 518, "layerscale_value": 1.0}  # fmt: skip


def _cuda_time(fn, iters: int) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def measure_peak(n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 matmul FLOP/s."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    return 2 * n**3 / _cuda_time(lambda: a @ b, iters)


def measure_unet(images: int = 8, steps: int = 50, dtype: str = "bf16") -> tuple[float, float]:
    """(images/s, FLOPs per UNet call) for ``steps`` CFG UNet calls over a batch of ``images`` 512 px images."""
    import torch
    from diffusers import UNet2DConditionModel

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    unet = UNet2DConditionModel(**SD15_UNET).to("cuda", torch_dtype).eval()
    unet = unet.to(memory_format=torch.channels_last)
    latents = torch.randn(2 * images, 4, 64, 64, device="cuda", dtype=torch_dtype)
    text = torch.randn(2 * images, 77, 768, device="cuda", dtype=torch_dtype)
    t = torch.tensor(500, device="cuda")

    @torch.inference_mode()
    def call():
        return unet(latents, t, encoder_hidden_states=text).sample

    for _ in range(3):
        call()
    per_call = _cuda_time(call, steps)
    return images / (per_call * steps), _flops(call)


def measure_vit_training(batch: int = 16, iters: int = 10) -> tuple[float, float, float]:
    """(triplets/s, seconds per step, FLOPs per step) of LoRA InfoNCE on a random ViT-B/14 at 224 px."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from personalization.config import ModelConfig, TrainConfig
    from personalization.contrastive.losses import build_loss
    from personalization.contrastive.step import TorchStepper, train_step
    from personalization.models import BACKBONES, apply_lora
    from personalization.models.encoder import Encoder

    torch.manual_seed(0)
    backbone = Dinov2Model(Dinov2Config(**DINOV2_VITB14, attn_implementation="sdpa"))
    encoder = apply_lora(Encoder(BACKBONES["dinov2_vitb14"], backbone), ModelConfig()).to("cuda")
    params = [p for p in encoder.parameters() if p.requires_grad]
    stepper = TorchStepper(torch.optim.Adam(params, lr=3e-4, betas=(0.5, 0.999)))
    loss = build_loss(TrainConfig())
    data = [torch.randn(batch, 3, 224, 224, device="cuda") for _ in range(3)]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return train_step(encoder, data, loss, stepper)

    for _ in range(3):
        step()
    seconds = _cuda_time(step, iters)
    return batch / seconds, seconds, _flops(step)


def measure(images: int = 8, steps: int = 50, train_batch: int = 16) -> Result:
    import torch

    if not torch.cuda.is_available():
        result = Result("gpu", "skipped: no CUDA", float("nan"))
        result.notes.append("skipped: no CUDA")
        return result
    peak = measure_peak()
    result = Result("gpu", "SD 1.5 UNet generation MFU (bf16, CFG, 50 steps, 512 px)", 0.0, goal=0.40)
    result.add(f"device: {torch.cuda.get_device_name(0)}; measured bf16 matmul peak", peak / 1e12, "TFLOP/s")
    rate, unet_flops = measure_unet(images, steps)
    gen_mfu = rate / images * steps * unet_flops / peak
    result.add(f"SD 1.5 UNet, batch {images} (UNet batch {2 * images}): images/s", rate, "images/s")
    result.add("UNet FLOPs per call", unet_flops / 1e12, "TFLOP")
    result.add("generation MFU", gen_mfu, "of peak")
    samples, seconds, step_flops = measure_vit_training(train_batch)
    result.add(f"ViT-B/14 LoRA InfoNCE, batch {train_batch} triplets: samples/s", samples, "triplets/s")
    result.add("train step FLOPs", step_flops / 1e12, "TFLOP")
    result.add("training MFU (goal >= 0.30)", step_flops / seconds / peak, "of peak")
    result.ratio = gen_mfu
    return result
