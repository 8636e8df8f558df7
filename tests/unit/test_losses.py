import math

import pytest
import torch
import torch.nn.functional as F

from personalization.config import ConfigError, TrainConfig
from personalization.contrastive.losses import (
    LOSSES,
    build_loss,
    cross_entropy,
    hinge,
    info_nce,
    multi_positive_info_nce,
)


def _unit(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def _naive_info_nce(anchor, positive, negative, tau):
    losses = []
    for p in positive:
        for q in anchor:
            logits = [float(q @ p) / tau] + [float(q @ n) / tau for n in negative]
            losses.append(-logits[0] + math.log(sum(math.exp(x) for x in logits)))
    return sum(losses) / len(losses)


def _naive_multi(anchor, positive, negative, tau):
    losses = []
    for q in anchor:
        pos = [math.exp(float(q @ p) / tau) for p in positive]
        neg = [math.exp(float(q @ n) / tau) for n in negative]
        losses.append(-math.log(sum(pos)) + math.log(sum(pos) + sum(neg)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("sizes", [(4, 4, 4), (3, 5, 7), (1, 1, 1)])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_info_nce_matches_naive_loop(sizes, tau):
    a, p, n = _unit(sizes[0], 8, seed=1), _unit(sizes[1], 8, seed=2), _unit(sizes[2], 8, seed=3)
    assert float(info_nce(a, p, n, temperature=tau)) == pytest.approx(_naive_info_nce(a, p, n, tau), rel=1e-9)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_info_nce_equal_logits_is_log_b_plus_one(batch):
    same = F.normalize(torch.ones(batch, 6, dtype=torch.float64), dim=-1)
    assert float(info_nce(same, same, same)) == pytest.approx(math.log(batch + 1), rel=1e-12)


def test_info_nce_lower_when_positives_are_close():
    a = _unit(8, 16, seed=4)
    n = _unit(8, 16, seed=5)
    close = F.normalize(a + 0.01 * _unit(8, 16, seed=6), dim=-1)
    assert float(info_nce(a, close, n)) < float(info_nce(a, n.flip(0), close))


@pytest.mark.parametrize("sizes", [(4, 4, 4), (2, 3, 6)])
def test_multi_positive_matches_naive_loop(sizes):
    a, p, n = _unit(sizes[0], 8, seed=7), _unit(sizes[1], 8, seed=8), _unit(sizes[2], 8, seed=9)
    got = float(multi_positive_info_nce(a, p, n, temperature=0.1))
    assert got == pytest.approx(_naive_multi(a, p, n, 0.1), rel=1e-9)


def test_multi_positive_equal_logits():
    same = F.normalize(torch.ones(5, 3, dtype=torch.float64), dim=-1)
    assert float(multi_positive_info_nce(same, same[:2], same)) == pytest.approx(math.log(7 / 2), rel=1e-12)


def test_hinge_analytic_cases():
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    one = lambda v: v[None]  # noqa: E731
    # positive == anchor (d=0), negative orthogonal (d=1): satisfied, loss 0.
    assert float(hinge(one(e1), one(e1), one(e2), margin=0.05)) == 0.0
    # positive orthogonal (d=1), negative == anchor (d=0): 1 - 0 + m.
    assert float(hinge(one(e1), one(e2), one(e1), margin=0.05)) == pytest.approx(1.05)
    # both orthogonal: d_p = d_n = 1 -> the margin.
    assert float(hinge(one(e1), one(e2), one(e3), margin=0.2)) == pytest.approx(0.2)
    # opposite positive (d=2), negative == anchor: 2 + m; batch mean with a zero-loss row.
    batch = hinge(torch.stack([e1, e1]), torch.stack([-e1, e1]), torch.stack([e1, e2]), margin=0.1)
    assert float(batch) == pytest.approx((2.1 + 0.0) / 2)


def test_hinge_needs_aligned_batches():
    with pytest.raises(ValueError, match="row-aligned"):
        hinge(_unit(2, 4), _unit(3, 4), _unit(2, 4))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        info_nce(_unit(2, 4), _unit(2, 5), _unit(2, 4))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        info_nce(_unit(4), _unit(2, 4), _unit(2, 4))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_gradients_flow_to_all_inputs(loss):
    fn = build_loss(TrainConfig(loss=loss, margin=0.5))
    raw = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    value = fn(*(F.normalize(r, dim=-1) for r in raw))
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    for tensor in raw:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_build_loss_uses_config_values():
    a, p, n = _unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(4, 8, seed=3)
    fn = build_loss(TrainConfig(loss="infonce", temperature=0.3))
    assert float(fn(a, p, n)) == pytest.approx(float(info_nce(a, p, n, temperature=0.3)))
    fn = build_loss(TrainConfig(loss="hinge", margin=0.4))
    assert float(fn(a, p, n)) == pytest.approx(float(hinge(a, p, n, margin=0.4)))


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_cross_entropy_matches_torch_bce(tau):
    a, p, n = _unit(3, 8, seed=11), _unit(4, 8, seed=12), _unit(5, 8, seed=13)
    positive_logits, negative_logits = (a @ p.T) / tau, (a @ n.T) / tau
    expected = 0.5 * (
        F.binary_cross_entropy_with_logits(positive_logits, torch.ones_like(positive_logits))
        + F.binary_cross_entropy_with_logits(negative_logits, torch.zeros_like(negative_logits))
    )
    assert float(cross_entropy(a, p, n, temperature=tau)) == pytest.approx(float(expected), rel=1e-12)


def test_cross_entropy_by_hand():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    # anchor == positive (cos 1), negative orthogonal (cos 0), tau 1: (-log s(1) - log(1 - s(0))) / 2.
    by_hand = 0.5 * (math.log(1 + math.exp(-1.0)) + math.log(2.0))
    assert float(cross_entropy(e1[None], e1[None], e2[None], temperature=1.0)) == pytest.approx(by_hand, rel=1e-12)
    # every pair orthogonal: sigmoid(0) = 1/2 on both sides, loss log 2 at any temperature.
    assert float(cross_entropy(e1[None], e2[None], e2[None], temperature=0.07)) == pytest.approx(math.log(2.0))


def test_cross_entropy_training_separates_positives_from_negatives():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(16, 8)
    center = torch.randn(16)
    anchors, positives = center + 0.5 * torch.randn(4, 16), center + 0.5 * torch.randn(4, 16)
    negatives = torch.randn(4, 16)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    loss_fn = build_loss(TrainConfig(loss="cross_entropy"))

    def embed():
        return [F.normalize(encoder(x), dim=-1) for x in (anchors, positives, negatives)]

    def measure():  # (loss, mean positive cosine - mean negative cosine)
        with torch.no_grad():
            a, p, n = embed()
            return float(loss_fn(a, p, n)), float((a @ p.T).mean() - (a @ n.T).mean())

    first_loss, first_gap = measure()
    for _ in range(20):
        loss = loss_fn(*embed())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last_loss, last_gap = measure()
    assert last_loss < 0.5 * first_loss
    assert last_gap > first_gap + 0.3


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_builds_from_the_config(name):
    spec = LOSSES[name]
    train_cfg = TrainConfig(loss=name, temperature=0.2, margin=0.3)
    a, p, n = _unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(4, 8, seed=3)
    direct = spec.fn(a, p, n, **{key: getattr(train_cfg, key) for key in spec.settings})
    assert float(build_loss(train_cfg)(a, p, n)) == float(direct)
    assert float(build_loss(train_cfg, gather=True)(a, p, n)) == float(direct)  # one process: nothing to gather


def test_config_choices_are_the_table():
    with pytest.raises(ConfigError, match=r"train\.loss: must be one of \['cross_entropy', 'hinge'"):
        TrainConfig(loss="mse").validate()
