"""Which val objects a sweep selects on, and which only serve as training negatives (no Ray here).

A sweep trial personalizes several val objects, the *probes*, and its metric is the mean of their
``val/pr_auc``, each scored against the other probes' photos. The remaining val objects form the negatives
*pool*: with ``train.negatives=val`` a probe trains against pool objects of its category only. So no object is
ever both a training negative and a distractor of the metric, which would favour settings such as "more
negatives" for the wrong reason.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from personalization.errors import UserError

PROBE_SPLIT = "sweep_probe"  # a probe's split in the training view of instances.json: neither val nor test


@dataclass(frozen=True)
class ValPartition:
    """``probes``: trained and scored (sorted); ``pool``: the other val objects, negatives only (sorted)."""

    probes: tuple[str, ...]
    pool: tuple[str, ...]


def partition_val(
    instances: Mapping[str, Mapping[str, str]],
    count: int,
    seed: int,
    needs_pool: bool,
    chosen: Sequence[str] = (),
) -> ValPartition:
    """Split the val objects of ``instances`` (``instances.json``) into probes and pool, the same way every time.

    Up to ``count`` probes are drawn in an order shuffled by ``seed`` (or exactly ``chosen``, e.g.
    ``data.instances``). With ``needs_pool`` (``train.negatives`` resolves to ``val``), an object becomes a probe
    only while another object of its category stays in the pool, so each probe keeps negatives of its category.
    A :class:`UserError` naming the counts and the fixes when fewer than 2 probes result (or not all of ``chosen``).
    """
    val = sorted(i for i, info in instances.items() if info["split"] == "val")
    wrong = [i for i in chosen if i not in val]
    if wrong:
        raise UserError(
            f"sweep: data.instances={list(chosen)}: {wrong} are not val objects (sweeps never tune on test "
            f"objects); val objects: {', '.join(val) or 'none'}"
        )
    order = sorted(chosen) if chosen else list(val)
    random.Random(seed).shuffle(order)
    wanted = len(chosen) or count
    left = Counter(instances[i]["category"] for i in val)  # val objects of each category not yet probes
    probes: list[str] = []
    for instance in order:
        category = instances[instance]["category"]
        if len(probes) == wanted:
            break
        if needs_pool and left[category] <= 1:
            continue
        probes.append(instance)
        left[category] -= 1
    if len(probes) < max(2, len(chosen)):
        raise UserError(_too_few_message(instances, val, probes, needs_pool, chosen))
    return ValPartition(tuple(sorted(probes)), tuple(i for i in val if i not in probes))


def _too_few_message(instances, val, probes, needs_pool: bool, chosen: Sequence[str]) -> str:
    per_category = Counter(instances[i]["category"] for i in val)
    counts = ", ".join(f"{c}: {n}" for c, n in sorted(per_category.items())) or "none"
    if needs_pool:
        rule = (
            "at least 2 probe objects, each with another val object of its category left over as its training "
            "negatives (train.negatives=val)"
        )
        fix = (
            "add val objects (3 of one category, or 2 in each of two categories, is the least), or train on other "
            "negatives (train.negatives=folder with train.negatives_dir=DIR, generated or stock)"
        )
    else:
        rule, fix = "at least 2 probe objects", "add val objects to the dataset (split `val` in its info file)"
    wanted = f" of data.instances={list(chosen)}" if chosen else ""
    return (
        f"sweep: {len(val)} val objects ({counts}) allow only {len(probes)} probes{wanted}; selecting settings "
        f"needs {rule}. Fix: {fix}"
    )


def hide_probes(instances: Mapping[str, Mapping[str, str]], probes: Sequence[str]) -> dict[str, dict]:
    """``instances.json`` as the probes' training sees it: probes get split :data:`PROBE_SPLIT`, so that
    ``train.negatives=val`` (val objects of the category, the trained one excluded) draws from the pool only."""
    return {i: {**info, "split": PROBE_SPLIT} if i in probes else dict(info) for i, info in instances.items()}
