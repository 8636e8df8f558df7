"""Triplet sampling by image id: (anchor, positive, negative), seeded, with replacement as in the reference.

Only ids are handled here; :mod:`personalization.contrastive.data` turns them into pixels.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from personalization.errors import UserError


class TripletError(UserError):
    """An empty or inconsistent pool of training images; the message says where the images come from."""


def _pool(ids: Sequence[str], cap: int, rng: random.Random) -> list[str]:
    """Unique ids in a stable order, then a seeded subset of ``cap`` of them (``cap=0`` keeps all)."""
    unique = sorted(set(ids))
    if cap and cap < len(unique):
        unique = sorted(rng.sample(unique, cap))
    return unique


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
) -> list[tuple[str, str, str]]:
    """``num_triplets`` (anchor_id, positive_id, negative_id) tuples drawn with replacement.

    - ``num_positives`` / ``num_negatives`` cap the positive / negative pools to a seeded subset (0 = all).
    - ``num_pairs`` > 0 first draws that many distinct (anchor, positive) pairs (at most
      ``len(anchors) * len(positives)``); triplet ``k`` uses pair ``k mod num_pairs`` with a fresh random negative.
      ``num_pairs = 0`` draws anchor and positive independently for each triplet.

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

    if num_pairs:
        all_pairs = len(anchors) * len(positives)
        if num_pairs >= all_pairs:
            pairs = list(itertools.product(anchors, positives))
            rng.shuffle(pairs)
        else:
            # Sample pair indices without replacement so no pair repeats, without materializing the product.
            picked = rng.sample(range(all_pairs), num_pairs)
            pairs = [(anchors[k // len(positives)], positives[k % len(positives)]) for k in picked]
        return [(*pairs[k % len(pairs)], rng.choice(negatives)) for k in range(num_triplets)]
    return [(rng.choice(anchors), rng.choice(positives), rng.choice(negatives)) for _ in range(num_triplets)]
