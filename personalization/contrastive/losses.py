"""Contrastive losses on (anchor, positive, negative) embedding batches.

All losses take three tensors of L2-normalized embeddings, shapes ``(B_a, D)``, ``(B_p, D)``, ``(B_n, D)``
(in training the three batch sizes are equal), and return a scalar. They do **not** renormalize: the encoder
already returns unit vectors, and renormalizing twice would only hide a bug upstream. With unit vectors the
dot product is the cosine similarity.

Notation: ``q_j`` anchors, ``p_i`` positives, ``n_k`` negatives, ``tau`` the temperature.

``LOSSES`` (at the end) is the one table of losses by ``train.loss`` name; the config's choices come from it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> None:
    for name, tensor in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        if tensor.ndim != 2 or tensor.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (B, D) tensor, got shape {tuple(tensor.shape)}")
    if not anchor.shape[1] == positive.shape[1] == negative.shape[1]:
        raise ValueError(
            f"embedding sizes differ: anchor {anchor.shape[1]}, positive {positive.shape[1]}, "
            f"negative {negative.shape[1]}"
        )


def info_nce(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """InfoNCE over every (positive, anchor) pair of the batch, with the batch's negatives shared.

    For each positive ``p_i`` and each anchor ``q_j`` the logits are
    ``[q_j.p_i, q_j.n_1, ..., q_j.n_B] / tau`` and the loss is the cross-entropy on index 0:

        l_ij = -q_j.p_i / tau + log( exp(q_j.p_i / tau) + sum_k exp(q_j.n_k / tau) )
             = softplus( logsumexp_k(q_j.n_k / tau) - q_j.p_i / tau )

    averaged over all ``B_p * B_a`` pairs. When all dot products are equal, ``loss = log(B_n + 1)``.

    Args:
        anchor: ``(B_a, D)`` L2-normalized anchors (real images).
        positive: ``(B_p, D)`` L2-normalized positives (synthetic images of the instance).
        negative: ``(B_n, D)`` L2-normalized negatives.
    Returns:
        Scalar tensor.
    """
    _check(anchor, positive, negative)
    positive_logits = anchor @ positive.T / temperature  # (B_a, B_p): [j, i] = q_j.p_i / tau
    negative_lse = torch.logsumexp(anchor @ negative.T / temperature, dim=1, keepdim=True)  # (B_a, 1)
    # softplus(x) = log(1 + e^x) is the two-term logsumexp, written stably.
    return F.softplus(negative_lse - positive_logits).mean()


def multi_positive_info_nce(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """InfoNCE with all positives in the numerator, one term per anchor.

        l_j = -logsumexp_i(q_j.p_i / tau) + logsumexp([q_j.p_1..q_j.p_Bp, q_j.n_1..q_j.n_Bn] / tau)

    averaged over the ``B_a`` anchors. Shapes as in :func:`info_nce`. With equal dot products,
    ``loss = log((B_p + B_n) / B_p)``.
    """
    _check(anchor, positive, negative)
    positive_logits = anchor @ positive.T / temperature  # (B_a, B_p)
    negative_logits = anchor @ negative.T / temperature  # (B_a, B_n)
    everything = torch.cat([positive_logits, negative_logits], dim=1)
    return (torch.logsumexp(everything, dim=1) - torch.logsumexp(positive_logits, dim=1)).mean()


def hinge(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """Triplet margin loss on cosine distances of the embeddings (the reference applied it to pixels, a bug).

        d(x, y) = 1 - x.y            (cosine distance; inputs are unit vectors)
        l_i = max(0, d(a_i, p_i) - d(a_i, n_i) + margin)

    averaged over the batch. Here the three tensors are row-aligned triplets: all ``(B, D)``.
    """
    _check(anchor, positive, negative)
    if not anchor.shape[0] == positive.shape[0] == negative.shape[0]:
        raise ValueError("hinge needs row-aligned triplets: anchor, positive and negative of the same batch size")
    distance_positive = 1.0 - (anchor * positive).sum(dim=1)
    distance_negative = 1.0 - (anchor * negative).sum(dim=1)
    return F.relu(distance_positive - distance_negative + margin).mean()


def cross_entropy(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Binary cross-entropy of a logistic on scaled cosine similarity: is this image the anchor's object?

    Every (anchor, positive) pair of the batch is labelled 1 and every (anchor, negative) pair 0; the logit of a
    pair is its cosine similarity over ``tau`` (decision boundary at cosine 0), and the two groups weigh equally:

        P(same | q, x) = sigmoid(q.x / tau)
        loss = 1/2 mean_ij softplus(-q_j.p_i / tau) + 1/2 mean_jk softplus(q_j.n_k / tau)

    (``softplus(-z) = -log sigmoid(z)`` and ``softplus(z) = -log(1 - sigmoid(z))``, the two BCE terms.) Unlike
    InfoNCE the pairs do not compete: each is judged alone against a fixed boundary. With all dot products 0,
    ``loss = log 2``. Shapes as in :func:`info_nce`.

    The paper compares a cross-entropy loss beside the three above, but neither REFERENCE.md nor the reference
    code defines it; this pairwise binary reading (scaled like InfoNCE, by ``train.temperature``) is this
    project's choice.
    """
    _check(anchor, positive, negative)
    positive_term = F.softplus(-(anchor @ positive.T) / temperature).mean()  # (B_a, B_p) pairs, label 1
    negative_term = F.softplus((anchor @ negative.T) / temperature).mean()  # (B_a, B_n) pairs, label 0
    return 0.5 * (positive_term + negative_term)


def gather_across_workers(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` on each of W ranks -> ``(W * B, D)`` on every rank, rank order, gradients kept.

    Lets the loss see the whole global batch (more negatives per anchor). Every rank then computes the same
    loss; the all-gather's backward sums the W copies' gradients into each local embedding, and DDP's gradient
    averaging divides by W again, so the parameter gradient equals that of one worker with the global batch.
    Without an initialized process group (or with one rank) the tensor is returned unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


@dataclass(frozen=True)
class LossSpec:
    """A loss as the config builds it: the function and the ``train`` fields it takes as keyword arguments.

    ``across_batch``: the loss compares every anchor with every positive and negative of the batch, so gathering
    the batches of all workers gives it more pairs; a per-triplet loss (hinge) gains nothing and never gathers.
    """

    fn: Callable[..., torch.Tensor]
    settings: tuple[str, ...]
    across_batch: bool = True

    def build(self, train_cfg, gather: bool = False) -> LossFn:
        kwargs = {name: getattr(train_cfg, name) for name in self.settings}
        if not (gather and self.across_batch):
            return functools.partial(self.fn, **kwargs)
        return lambda a, p, n: self.fn(
            gather_across_workers(a), gather_across_workers(p), gather_across_workers(n), **kwargs
        )


# The one table of losses: `train.loss` accepts exactly these names (TrainConfig.validate reads it). A new loss is
# its function above plus one entry here (and its test in tests/unit/test_losses.py).
LOSSES: dict[str, LossSpec] = {
    "infonce": LossSpec(info_nce, ("temperature",)),
    "multi_infonce": LossSpec(multi_positive_info_nce, ("temperature",)),
    "hinge": LossSpec(hinge, ("margin",), across_batch=False),
    "cross_entropy": LossSpec(cross_entropy, ("temperature",)),
}


def build_loss(train_cfg, gather: bool = False) -> LossFn:
    """``(anchor, positive, negative) -> scalar`` for ``train.loss``, with its settings from ``train_cfg``.

    ``gather=True`` first gathers the batches across distributed workers (see :func:`gather_across_workers`) for
    the losses that compare across the batch.
    """
    if train_cfg.loss not in LOSSES:
        raise ValueError(f"train.loss={train_cfg.loss!r}: use one of {sorted(LOSSES)}")
    return LOSSES[train_cfg.loss].build(train_cfg, gather)
