"""Custom Ray metrics for the dashboard's Metrics view (Prometheus / Grafana): a few calls stage code can make.

Stage code records through the helpers below; each is safe to call anywhere:

- inside a Ray task, actor or driver (``ray.is_initialized()``): the value goes to Ray's metrics agent;
- without Ray (a unit test, the plain library path): nothing happens;
- if recording fails for any reason: a warning is logged once and the stage carries on (metrics never break work).

helper (stage code calls)               Ray metric, type            Prometheus / Grafana name
count_generated(n, stage=, instance=)   images_generated, Counter   ray_personalize_images_generated_total
count_accepted(n, stage=, instance=)    images_accepted, Counter    ray_personalize_images_accepted_total
set_acceptance_rate(r, ...)             acceptance_rate, Gauge      ray_personalize_filter_acceptance_rate
set_train_loss(loss, ...)               train_loss, Gauge           ray_personalize_train_loss
record_filter_batch(generated, accepted, ...) does the first three at once.

Every metric carries the tags ``stage`` (e.g. ``generate``, ``filter``, ``cutpaste``, ``train``) and ``instance``
(the instance id, or ``all``). Ray adds the ``ray_`` prefix on export and the ``_total`` suffix to counters; a
counter is cumulative per process, so a dashboard query sums over workers: ``sum by (instance)
(ray_personalize_images_accepted_total)``. Acceptance rate = accepted / generated, in [0, 1].
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.metrics import Counter, Gauge

log = logging.getLogger("personalize")

TAG_KEYS = ("stage", "instance")

# key -> (registered name, "counter" | "gauge", description)
METRICS: dict[str, tuple[str, str, str]] = {
    "images_generated": (
        "personalize_images_generated",
        "counter",
        "Images sampled by a generator (DreamBooth, pretrained, cut-and-paste), before filtering",
    ),
    "images_accepted": (
        "personalize_images_accepted",
        "counter",
        "Generated images the filter accepts: score >= filter.threshold (every image when the stage does not filter)",
    ),
    "filter_acceptance_rate": (
        "personalize_filter_acceptance_rate",
        "gauge",
        "Fraction of generated images the filter accepted so far, accepted / generated, in [0, 1]",
    ),
    "train_loss": ("personalize_train_loss", "gauge", "Latest contrastive training loss (InfoNCE / hinge)"),
}

_registry: dict[str, Any] = {}  # key -> ray.util.metrics object, created on first use in this process
_warned = False


def _ray_ready() -> bool:
    return ray.is_initialized()


def get_metric(key: str) -> Any | None:
    """The process-wide metric object for ``key`` (see METRICS), created on first use; None without Ray.

    Ray metric objects are cheap handles but must be created once per process, not once per record: this
    get-or-create registry is what lets stage code call the helpers from any task or actor method.
    """
    if key not in METRICS:
        raise KeyError(f"unknown metric {key!r}; known: {', '.join(METRICS)}")
    if not _ray_ready():
        return None
    if key not in _registry:
        name, kind, description = METRICS[key]
        cls = Counter if kind == "counter" else Gauge
        _registry[key] = cls(name, description=description, tag_keys=TAG_KEYS)
    return _registry[key]


def record(key: str, value: float, *, stage: str, instance: str = "all") -> bool:
    """Add ``value`` to a counter or set a gauge to it. Returns True when Ray took the value, False otherwise."""
    global _warned
    try:
        metric = get_metric(key)
        if metric is None:
            return False
        tags = {"stage": str(stage), "instance": str(instance or "all")}
        if METRICS[key][1] == "counter":
            if value <= 0:  # Ray counters reject 0 increments; nothing to count
                return False
            metric.inc(float(value), tags=tags)
        else:
            metric.set(float(value), tags=tags)
        return True
    except KeyError:
        raise
    except Exception as error:  # a metrics hiccup must never fail a stage
        if not _warned:
            log.warning("metrics: could not record %s=%s (%s); further metric errors are silent", key, value, error)
            _warned = True
        return False


def count_generated(n: int, *, stage: str, instance: str = "all") -> bool:
    """``n`` more images sampled (before filtering)."""
    return record("images_generated", n, stage=stage, instance=instance)


def count_accepted(n: int, *, stage: str, instance: str = "all") -> bool:
    """``n`` more images accepted by the filter (or kept, for stages that do not filter)."""
    return record("images_accepted", n, stage=stage, instance=instance)


def set_acceptance_rate(rate: float, *, stage: str = "filter", instance: str = "all") -> bool:
    """Filter acceptance rate so far, accepted / generated, in [0, 1]."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {rate}")
    return record("filter_acceptance_rate", rate, stage=stage, instance=instance)


def set_train_loss(loss: float, *, stage: str = "train", instance: str = "all") -> bool:
    """The latest training loss of one instance's encoder."""
    return record("train_loss", loss, stage=stage, instance=instance)


def record_filter_batch(generated: int, accepted: int, *, stage: str = "filter", instance: str = "all") -> None:
    """One call per scored batch: counts both and updates the acceptance rate from this batch's totals.

    The rate gauge holds the batch's rate; the cumulative rate is the ratio of the two counters, which the
    dashboard computes across workers (``sum(accepted_total) / sum(generated_total)``).
    """
    count_generated(generated, stage=stage, instance=instance)
    count_accepted(accepted, stage=stage, instance=instance)
    if generated > 0:
        set_acceptance_rate(accepted / generated, stage=stage, instance=instance)
