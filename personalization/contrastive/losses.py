"""Contrastive losses on (anchor, positive, negative) embedding batches.

All losses take three tensors of L2-normalized embeddings, shapes ``(B_a, D)``, ``(B_p, D)``, ``(B_n, D)``
(in training the three batch sizes are equal), and return a scalar. They do **not** renormalize: the encoder
already returns unit vectors, and renormalizing twice would only hide a bug upstream. With unit vectors the
dot product is the cosine similarity.

Notation: ``q_j`` anchors, ``p_i`` positives, ``n_k`` negatives, ``tau`` the temperature.
"""

from __future__ import annotations

from collections.abc import Callable

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


def build_loss(train_cfg, gather: bool = False) -> LossFn:
    """``(anchor, positive, negative) -> scalar`` from ``train.loss``, ``train.temperature``, ``train.margin``.

    ``gather=True`` first gathers all three batches across distributed workers (see
    :func:`gather_across_workers`); the hinge loss is per-triplet and never gathers.
    """
    if train_cfg.loss == "hinge":
        margin = train_cfg.margin
        return lambda a, p, n: hinge(a, p, n, margin=margin)
    if train_cfg.loss == "infonce":
        base = info_nce
    elif train_cfg.loss == "multi_infonce":
        base = multi_positive_info_nce
    else:
        raise ValueError(f"train.loss={train_cfg.loss!r}: use infonce, multi_infonce or hinge")
    temperature = train_cfg.temperature
    if not gather:
        return lambda a, p, n: base(a, p, n, temperature=temperature)
    return lambda a, p, n: base(
        gather_across_workers(a), gather_across_workers(p), gather_across_workers(n), temperature=temperature
    )
