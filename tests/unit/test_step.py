import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from personalization.config import TrainConfig
from personalization.contrastive.losses import build_loss
from personalization.contrastive.step import TorchStepper, forward_triplets, train_step


class TinyEncoder(nn.Module):
    """A real (small) conv encoder with the Encoder's contract: (B, 3, H, W) -> (B, D) unit vectors."""

    def __init__(self, dim: int = 16, batch_norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.head = nn.Linear(8, dim)

    def forward(self, pixels):
        x = F.relu(self.norm(self.conv(pixels)))
        return F.normalize(self.head(x.mean(dim=(2, 3))), dim=-1)


def _batch(size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    anchor = torch.randn(size, 3, 16, 16, generator=generator)
    positive = anchor + 0.1 * torch.randn(size, 3, 16, 16, generator=generator)
    negative = torch.randn(size, 3, 16, 16, generator=generator)
    return anchor, positive, negative


def test_one_forward_equals_three_forwards_without_batch_norm():
    torch.manual_seed(0)
    model = TinyEncoder()
    batch = _batch()
    joint = forward_triplets(model, batch)
    for got, pixels in zip(joint, batch, strict=True):
        torch.testing.assert_close(got, model(pixels))


def test_train_step_matches_a_hand_written_step():
    torch.manual_seed(0)
    model = TinyEncoder()
    reference = copy.deepcopy(model)
    loss_fn = build_loss(TrainConfig())
    batch = _batch()

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.999))
    metrics = train_step(model, batch, loss_fn, optimizer)

    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, betas=(0.5, 0.999))
    ref_loss = loss_fn(*(reference(x) for x in batch))
    ref_loss.backward()
    ref_optimizer.step()

    assert set(metrics) == {"train/loss"}
    assert metrics["train/loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    for param, ref_param in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, ref_param)
        assert param.grad is None  # zeroed for the next step


@pytest.mark.parametrize("loss", ["infonce", "multi_infonce", "hinge"])
def test_loss_falls_on_a_fixed_batch(loss):
    torch.manual_seed(0)
    model = TinyEncoder(batch_norm=True)
    optimizer = TorchStepper(torch.optim.Adam(model.parameters(), lr=1e-2))
    loss_fn = build_loss(TrainConfig(loss=loss, margin=0.5))
    batch = _batch(8)
    losses = [train_step(model, batch, loss_fn, optimizer)["train/loss"] for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]


def test_only_trainable_parameters_change():
    torch.manual_seed(0)
    model = TinyEncoder()
    model.conv.requires_grad_(False)
    frozen = model.conv.weight.clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_step(model, _batch(), build_loss(TrainConfig()), optimizer)
    torch.testing.assert_close(model.conv.weight, frozen)


def test_works_with_a_ddp_wrapped_model(tmp_path):
    torch.manual_seed(0)
    model = TinyEncoder()
    reference = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        loss_fn = build_loss(TrainConfig(), gather=True)  # one rank: gathering is the identity
        metrics = train_step(ddp, _batch(), loss_fn, torch.optim.SGD(ddp.parameters(), lr=0.1))
    finally:
        dist.destroy_process_group()
    ref_metrics = train_step(
        reference, _batch(), build_loss(TrainConfig()), torch.optim.SGD(reference.parameters(), lr=0.1)
    )
    assert metrics["train/loss"] == pytest.approx(ref_metrics["train/loss"], rel=1e-6)
    for param, ref_param in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, ref_param)


def test_rejects_something_that_is_not_an_optimizer():
    with pytest.raises(TypeError, match="Optimizer or a Stepper"):
        train_step(TinyEncoder(), _batch(), build_loss(TrainConfig()), object())
