"""Triplet sampling by image id: (anchor, positive, negative), seeded, with replacement as in the reference.

Only ids are handled here; :mod:`personalization.contrastive.data` turns them into pixels.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence

from personalization.errors import UserError


class TripletError(UserError):
    """An empty or inconsistent pool of training images; the message says where the images come from."""


def _pool(ids: Sequence[str], cap: int, rng: random.Random) -> list[str]:
    """Unique ids in a stable order, then a seeded subset of ``cap`` of them (``cap=0`` keeps all)."""
    unique = sorted(set(ids))
    if cap and cap < len(unique):
        unique = sorted(rng.sample(unique, cap))
    return unique


def compute_quotas(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` by largest remainder: counts sum to ``total`` and each is within
    1 of ``total * w / sum(w)`` (ties go to the first-named key)."""
    whole = sum(weights.values())
    exact = {key: total * weight / whole for key, weight in weights.items()}
    counts = {key: math.floor(value) for key, value in exact.items()}
    order = sorted(weights, key=lambda key: (-(exact[key] - counts[key]), list(weights).index(key)))
    for key in order[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def sample_triplets(
    anchor_ids: Sequence[str],
    positive_ids: Sequence[str],
    negative_ids: Sequence[str],
    *,
    num_triplets: int,
    num_positives: int = 0,
    num_negatives: int = 0,
    num_pairs: int = 0,
    seed: int = 0,
    instance_id: str = "",
    positive_groups: Mapping[str, Sequence[str]] | None = None,
    source_weights: Mapping[str, float] | None = None,
) -> list[tuple[str, str, str]]:
    """``num_triplets`` (anchor_id, positive_id, negative_id) tuples drawn with replacement.

    - ``num_positives`` / ``num_negatives`` cap the positive / negative pools to a seeded subset (0 = all).
    - ``num_pairs`` > 0 first draws that many distinct (anchor, positive) pairs (at most
      ``len(anchors) * len(positives)``); triplet ``k`` uses pair ``k mod num_pairs`` with a fresh random negative.
      ``num_pairs = 0`` draws anchor and positive independently for each triplet.

    - ``source_weights`` (``train.source_weights``, e.g. ``{"real": 1, "cutpaste": 3}``) with ``positive_groups``
      (source -> its positive ids): each source's share of the triplets (and of the ``num_pairs`` pairs) is
      its weight's share, exactly up to rounding (:func:`compute_quotas`), the sources' triplets in a seeded
      order; empty = one pool of every positive (the plain union).

    Anchors and positives may share ids (``positive_sources`` containing ``real``: the real photos are their own
    positives), but a negative may never be an anchor or a positive.
    """
    name = instance_id or "?"
    if num_triplets <= 0:
        raise TripletError(f"num_triplets must be > 0, got {num_triplets}")
    if not anchor_ids:
        raise TripletError(f"instance {name} has no real train images (role real_train in OUT/ingest/images.parquet)")
    if not positive_ids:
        raise TripletError(
            f"no synthetic positives for instance {name}: enable cutpaste or generate (cutpaste.enabled=true, or "
            "dreambooth.enabled=true generate.enabled=true) and name the source in train.positive_sources"
        )
    if not negative_ids:
        raise TripletError(
            f"no negatives for instance {name}: train.negatives=val takes images of the val instances of the same "
            "category (ingest them, e.g. the full dataset); train.negatives=folder reads train.negatives_dir "
            "(<category>_negatives/ or a flat folder); train.negatives=generated uses the generate stage's "
            "role=negative rows (generate.negatives_per_category > 0)"
        )
    leaked = set(negative_ids) & (set(anchor_ids) | set(positive_ids))
    if leaked:
        raise TripletError(
            f"instance {name}: {len(leaked)} negative ids are also anchors/positives, e.g. {min(leaked)}"
        )

    rng = random.Random(seed)
    anchors = _pool(anchor_ids, 0, rng)
    positives = _pool(positive_ids, num_positives, rng)
    negatives = _pool(negative_ids, num_negatives, rng)

    if source_weights:
        groups = _weighted_groups(positives, positive_groups or {}, source_weights, name)
        return _weighted_triplets(anchors, groups, negatives, source_weights, num_triplets, num_pairs, rng)
    if num_pairs:
        pairs = _draw_pairs(anchors, positives, num_pairs, rng)
        return [(*pairs[k % len(pairs)], rng.choice(negatives)) for k in range(num_triplets)]
    return [(rng.choice(anchors), rng.choice(positives), rng.choice(negatives)) for _ in range(num_triplets)]


def _draw_pairs(anchors: list[str], positives: list[str], num_pairs: int, rng: random.Random) -> list[tuple[str, str]]:
    """``num_pairs`` distinct (anchor, positive) pairs (all of them, shuffled, when there are no more)."""
    all_pairs = len(anchors) * len(positives)
    if num_pairs >= all_pairs:
        pairs = list(itertools.product(anchors, positives))
        rng.shuffle(pairs)
        return pairs
    # Sample pair indices without replacement so no pair repeats, without materializing the product.
    picked = rng.sample(range(all_pairs), num_pairs)
    return [(anchors[k // len(positives)], positives[k % len(positives)]) for k in picked]


def _weighted_groups(
    positives: list[str], groups: Mapping[str, Sequence[str]], weights: Mapping[str, float], name: str
) -> dict[str, list[str]]:
    """Each weighted source's ids among the (possibly capped) positive pool; an empty one is an error."""
    pool = set(positives)
    out = {}
    for source, weight in weights.items():
        ids = sorted(set(groups.get(source, ())) & pool)
        if weight > 0 and not ids:
            raise TripletError(
                f"instance {name}: train.source_weights gives {source} weight {weight} but it has no positives "
                f"(after train.num_positives); make that source's images or drop its weight"
            )
        out[source] = ids
    return out


def _weighted_triplets(
    anchors: list[str],
    groups: Mapping[str, list[str]],
    negatives: list[str],
    weights: Mapping[str, float],
    num_triplets: int,
    num_pairs: int,
    rng: random.Random,
) -> list[tuple[str, str, str]]:
    """Triplets whose positives come from each source in proportion to its weight (see :func:`sample_triplets`)."""
    quotas = compute_quotas(num_triplets, weights)
    order = [source for source in weights for _ in range(quotas[source])]
    rng.shuffle(order)
    if num_pairs:
        pair_quotas = compute_quotas(num_pairs, weights)
        pairs = {s: _draw_pairs(anchors, groups[s], max(1, pair_quotas[s]), rng) for s in weights if quotas[s] > 0}
        used = dict.fromkeys(weights, 0)
        out = []
        for source in order:
            out.append((*pairs[source][used[source] % len(pairs[source])], rng.choice(negatives)))
            used[source] += 1
        return out
    return [(rng.choice(anchors), rng.choice(groups[s]), rng.choice(negatives)) for s in order]
