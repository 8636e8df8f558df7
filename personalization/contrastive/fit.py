"""Contrastive fine-tuning on one process: :func:`fit` runs the epochs of triplet batches through
:func:`~personalization.contrastive.step.train_step`, with hooks for where it runs (a Ray Train worker, a test).

What runs is here; where it runs is the caller's, through small hooks:

- ``wrap(model)``: how the ``ddp`` strategy wraps the model for data parallelism (Ray Train's ``prepare_model``
  gives DDP); none on one process. The ``deepspeed`` strategy puts the model in a DeepSpeed engine instead
  (``torch.distributed`` must be up: Ray Train starts it).
- ``resume``: a checkpoint folder a previous run wrote; the run continues at its step.
- ``on_step(metrics)`` after every step, and ``on_checkpoint(report)`` every ``train.checkpoint_every`` steps
  (0: once per epoch) and once at the end, on every rank; ``report.write(folder)`` writes the checkpoint (every
  rank must call it: the replica hashes and DeepSpeed's shards are collectives).

A checkpoint folder holds ``state.json`` (step, loss history, start step, replica hashes, samples/s),
``trainable.pt`` (the weights that train), the optimizer (``optimizer.pt``, or DeepSpeed's ``deepspeed/``
shards) and, in the final one, ``adapter/`` (``save_model``). Augmentation and dropout draw from a stream
seeded by (seed, rank, step), and the batches of an epoch from (seed, epoch): a resumed run takes exactly the
draws an uninterrupted one takes, so it ends with the same losses and weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from personalization.contrastive.losses import build_loss
from personalization.contrastive.step import DeepSpeedStepper, TorchStepper, train_step


@dataclass
class TrainableModel:
    """What :func:`fit` trains: ``model(pixels) -> (B, D)`` unit features, the image transform, and how to save."""

    model: torch.nn.Module
    transform: Callable
    save: Callable[[torch.nn.Module, Path], None]


def build_lora_encoder(cfg) -> TrainableModel:
    """The default model: the configured backbone with LoRA, saved as a peft adapter; ``train.augment`` picks
    the training transform."""
    from personalization.models import apply_lora, build_encoder, build_transform, save_adapter

    encoder = apply_lora(build_encoder(cfg.model), cfg.model)
    return TrainableModel(
        encoder, build_transform(cfg.model, train=cfg.train.augment, crop_scale=cfg.train.crop_scale), save_adapter
    )


@dataclass
class FitState:
    """Where a run stands: steps done, the loss of each, and the step this process started at."""

    step: int = 0
    loss: list[float] = field(default_factory=list)
    start_step: int = 0


@dataclass
class Report:
    """What ``on_checkpoint`` gets: the metrics to report, whether the run is done, the unwrapped model (for
    extra metrics), and ``write(folder)``, which writes the checkpoint into ``folder``."""

    metrics: dict
    final: bool
    model: torch.nn.Module
    write: Callable[[Path], None]


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """Adam over the parameters that train (the LoRA weights), as ``train`` configures it."""
    return torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=train_cfg.learning_rate,
        betas=(train_cfg.beta1, train_cfg.beta2),
        weight_decay=train_cfg.weight_decay,
    )


def fit(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    train_cfg,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[torch.nn.Module], Callable] | None = None,
    resume: Path | None = None,
    save_model: Callable[[torch.nn.Module, Path], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[Report], None] | None = None,
) -> FitState:
    """Train ``model`` (on ``device``) on ``dataset``'s (anchor, positive, negative) triplets for
    ``train_cfg.epochs`` epochs, this process being ``rank`` of ``world``; returns the final :class:`FitState`.

    Each rank takes ``train.batch_size // world`` triplets per step, from its share of an epoch's shuffle; the
    loss is ``LOSSES[train.loss]`` (gathered across ranks when ``world > 1``).
    """
    per_worker = max(1, train_cfg.batch_size // world)
    steps_per_epoch = (len(dataset) // world) // per_worker
    if steps_per_epoch == 0:
        raise ValueError(f"train.num_triplets={len(dataset)} is below one batch ({per_worker} x {world} workers)")
    state = load_checkpoint(resume, model) if resume is not None else FitState()
    optimizer = build_optimizer(model, train_cfg)
    if train_cfg.strategy == "deepspeed":
        forward, stepper, module = _deepspeed_engine(model, optimizer, per_worker, train_cfg.zero_stage)
    else:
        forward, stepper, module = (wrap or (lambda m: m))(model), TorchStepper(optimizer), model
    if resume is not None:
        stepper.load_state(resume)
    loss_fn = build_loss(train_cfg, gather=world > 1)  # every rank's loss sees the global batch
    model.train()
    started = time.time()

    def write(folder: Path, final: bool) -> None:
        hashes = _replica_hashes(module, world)
        stepper.save_state(folder, rank)
        if rank == 0:
            samples_per_s = (state.step - state.start_step) * per_worker * world / max(time.time() - started, 1e-9)
            save_checkpoint(folder, state, module, hashes=hashes, samples_per_s=samples_per_s)
            if final and save_model is not None:
                save_model(module, folder / "adapter")

    def report(metrics: dict, final: bool) -> None:
        if on_checkpoint is not None:
            on_checkpoint(Report(metrics, final, module, lambda folder: write(Path(folder), final)))

    every = train_cfg.checkpoint_every or steps_per_epoch
    total_steps = steps_per_epoch * train_cfg.epochs
    for epoch in range(state.step // steps_per_epoch, train_cfg.epochs):
        for batch in _epoch_batches(dataset, state, per_worker, epoch * steps_per_epoch, seed, rank, world, epoch):
            metrics = train_step(forward, [x.to(device) for x in batch], loss_fn, stepper)
            state.step += 1
            state.loss.append(metrics["train/loss"])
            metrics = {**metrics, "step": state.step, "epoch": epoch}
            if on_step is not None:
                on_step(metrics)
            if state.step % every == 0 and state.step < total_steps:
                report(metrics, final=False)
    report({"train/loss": state.loss[-1] if state.loss else float("nan"), "step": state.step}, final=True)
    return state


def _epoch_batches(dataset, state: FitState, per_worker, epoch_start, seed, rank, world, epoch) -> Iterator:
    """This rank's batches of ``epoch`` from step ``state.step`` on (a resumed epoch skips the indices it has
    done without decoding them), each drawn after seeding the global RNG from (seed, rank, step)."""
    indices = epoch_indices(len(dataset), rank, world, seed, epoch)
    skip = (state.step - epoch_start) * per_worker
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices[skip:]),
        batch_size=per_worker,
        shuffle=False,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),  # iter(loader) must not draw from the global RNG
    )
    batches = iter(loader)
    while True:
        torch.manual_seed(step_seed(seed, rank, state.step))  # before decoding: augmentation draws from it
        batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _deepspeed_engine(model, optimizer, micro_batch: int, zero_stage: int):
    """(forward, stepper, module) of a DeepSpeed ZeRO engine around ``model`` and ``optimizer``."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, DeepSpeedStepper(engine), engine.module


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and determinism


def save_checkpoint(folder: Path, state: FitState, model: torch.nn.Module, *, hashes, samples_per_s) -> None:
    """``state.json`` and ``trainable.pt`` (the weights that train) into ``folder``; the optimizer's state is the
    stepper's (:meth:`TorchStepper.save_state`)."""
    done = {"step": state.step, "loss": state.loss, "start_step": state.start_step, "replica_hashes": hashes}
    done |= {"steps": state.step, "samples_per_s": samples_per_s}
    (folder / "state.json").write_text(json.dumps(done))
    torch.save({k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad},
               folder / "trainable.pt")  # fmt: skip


def load_checkpoint(folder: Path, model: torch.nn.Module) -> FitState:
    """The :class:`FitState` a checkpoint folder holds, its trainable weights loaded into ``model``."""
    saved = json.loads((Path(folder) / "state.json").read_text())
    model.load_state_dict(torch.load(Path(folder) / "trainable.pt", weights_only=True), strict=False)
    return FitState(step=saved["step"], loss=list(saved["loss"]), start_step=saved["step"])


def weights_hash(model: torch.nn.Module) -> str:
    """A short hash of the trainable weights (equal on every rank when the replicas agree)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _replica_hashes(model: torch.nn.Module, world: int) -> list[str]:
    if world == 1:
        return [weights_hash(model)]
    hashes = [None] * world
    torch.distributed.all_gather_object(hashes, weights_hash(model))
    return hashes


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).hexdigest()[:8], 16)


def epoch_indices(dataset_len: int, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """This rank's share of epoch ``epoch``'s shuffle (the same split ``DistributedSampler`` makes)."""
    sampler = torch.utils.data.DistributedSampler(
        range(dataset_len), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return list(sampler)
