"""pipelines.metrics: silent no-ops without Ray; real ray.util.metrics records inside Ray tasks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines import metrics

NO_RAY_CHECK = """
import sys
from pipelines import metrics
assert metrics.get_metric("train_loss") is None
assert metrics.count_generated(5, stage="generate", instance="mug_0") is False
assert metrics.count_accepted(2, stage="filter") is False
assert metrics.set_acceptance_rate(0.4) is False
assert metrics.set_train_loss(1.5, instance="mug_0") is False
metrics.record_filter_batch(10, 4, instance="mug_0")
assert metrics._registry == {}, metrics._registry  # nothing created
assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
print("silent")
"""


def test_helpers_are_silent_no_ops_without_ray():
    # a fresh interpreter: other tests of this session may have started Ray in this one
    done = subprocess.run([sys.executable, "-c", NO_RAY_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "silent"


def test_bad_calls_still_fail_loudly():
    with pytest.raises(KeyError, match="unknown metric"):
        metrics.record("images_lost", 1, stage="generate")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        metrics.set_acceptance_rate(1.5)


def test_helpers_record_inside_ray_tasks(ray_local):
    ray = ray_local

    @ray.remote
    def scored_batch(instance: str, generated: int, accepted: int, loss: float) -> list:
        recorded = [
            metrics.count_generated(generated, stage="generate", instance=instance),
            metrics.count_accepted(accepted, stage="filter", instance=instance),
            metrics.set_acceptance_rate(accepted / generated, instance=instance),
            metrics.set_train_loss(loss, instance=instance),
            metrics.count_accepted(0, stage="filter", instance=instance),  # nothing to count: skipped, no error
        ]
        metrics.record_filter_batch(generated, accepted, instance=instance)
        return [recorded, sorted(metrics._registry)]

    results = ray.get([scored_batch.remote(f"mug_{i}", 10, i, 1.0 / (i + 1)) for i in range(1, 4)])
    for recorded, registry in results:
        assert recorded == [True, True, True, True, False]
        assert registry == sorted(metrics.METRICS)  # one object per metric per process, reused across calls

    # The driver records too, and gets the same objects back each time (get-or-create).
    assert metrics.set_train_loss(0.25, instance="mug_1") is True
    assert metrics.get_metric("train_loss") is metrics.get_metric("train_loss")
    assert {name for name, _, _ in metrics.METRICS.values()} == {
        "personalize_images_generated",
        "personalize_images_accepted",
        "personalize_filter_acceptance_rate",
        "personalize_train_loss",
    }
