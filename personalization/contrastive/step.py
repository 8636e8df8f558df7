"""One contrastive training step, plain PyTorch: ``(model, batch, loss, optimizer) -> metrics``; no I/O.

The same function drives a bare module, a DDP-wrapped module, and a DeepSpeed engine. What differs between
them is only how the loss is backpropagated and how the update is applied, so that sits behind a two-method
:class:`Stepper` (``backward(loss)``, ``step()``): :class:`TorchStepper` for a ``torch.optim.Optimizer``,
:class:`DeepSpeedStepper` for an engine (``engine.backward`` scales and reduces, ``engine.step`` updates and
zeroes the gradients). Each also saves and loads its optimizer's state in a checkpoint folder
(``save_state`` / ``load_state``), since only it knows where that state lives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from personalization.contrastive.losses import LossFn


class Stepper(Protocol):
    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


class TorchStepper:
    """``loss.backward()``, then ``optimizer.step()`` and ``zero_grad``."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, folder: Path, rank: int) -> None:
        """``optimizer.pt`` (rank 0's: the replicas' optimizers agree)."""
        if rank == 0:
            torch.save(self.optimizer.state_dict(), Path(folder) / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        self.optimizer.load_state_dict(torch.load(Path(folder) / "optimizer.pt", weights_only=True))


class DeepSpeedStepper:
    """``engine.backward(loss)``, then ``engine.step()`` (it zeroes the gradients itself)."""

    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def save_state(self, folder: Path, rank: int) -> None:
        """``deepspeed/``: every rank writes its optimizer shard (a collective: every rank must call it)."""
        self.engine.save_checkpoint(str(Path(folder) / "deepspeed"), tag="state", exclude_frozen_parameters=True)

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(Path(folder) / "deepspeed"), load_module_strict=False)


def as_stepper(optimizer: torch.optim.Optimizer | Stepper) -> Stepper:
    """A torch optimizer is wrapped in :class:`TorchStepper`; anything with backward/step passes through."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return TorchStepper(optimizer)
    if hasattr(optimizer, "backward") and hasattr(optimizer, "step"):
        return optimizer
    raise TypeError(f"expected a torch.optim.Optimizer or a Stepper (backward, step), got {type(optimizer).__name__}")


def forward_triplets(
    model: Callable[[torch.Tensor], torch.Tensor], batch: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor, positive, negative) pixels, each ``(B, 3, H, W)`` -> three ``(B, D)`` embeddings.

    One forward pass over the ``3B`` images: faster than three passes, keeps normalization statistics
    consistent across roles, and lets DDP see exactly one forward per backward.
    """
    anchor, positive, negative = batch
    size = anchor.shape[0]
    features = model(torch.cat([anchor, positive, negative], dim=0))
    return features[:size], features[size : 2 * size], features[2 * size :]


def train_step(
    model: Callable[[torch.Tensor], torch.Tensor],
    batch: Sequence[torch.Tensor],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer | Stepper,
) -> dict[str, float]:
    """Forward the triplet batch, compute the loss, backpropagate, update. Returns ``{"train/loss": float}``.

    ``model(pixels)`` maps ``(N, 3, H, W)`` to ``(N, D)`` L2-normalized features (the Encoder does); the batch
    tensors must already be on the model's device.
    """
    stepper = as_stepper(optimizer)
    anchor, positive, negative = forward_triplets(model, batch)
    loss = loss_fn(anchor, positive, negative)
    stepper.backward(loss)
    stepper.step()
    return {"train/loss": float(loss.detach())}
