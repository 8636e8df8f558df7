"""pipelines.instances.concurrency against a real local Ray (2 CPUs, no GPU)."""

from __future__ import annotations

from personalization.config import build_config
from pipelines.instances import concurrency, worker_resources


def _cfg(tmp_path, **overrides):
    return build_config({"output_dir": str(tmp_path / "out"), **overrides})


def test_concurrency_follows_the_cluster_resources(tmp_path, ray_local):
    cfg = _cfg(tmp_path)  # ray_local: 2 CPUs, no GPU
    assert concurrency(cfg, {"CPU": 1}, pending=5) == 2
    assert concurrency(cfg, {"CPU": 2}, pending=5) == 1
    assert concurrency(cfg, {"CPU": 1}, pending=1) == 1
    assert concurrency(cfg, {"GPU": 0.5}, pending=5) == 1  # none fits yet (autoscaling): one at a time
    assert concurrency(cfg, {"CPU": 1}, pending=0) == 0
    assert concurrency(_cfg(tmp_path, ray={"max_concurrent": 3}), {"CPU": 1}, pending=5) == 3
    packed = _cfg(tmp_path, ray={"instances_per_gpu": 4})
    assert worker_resources(packed, use_gpu=True) == {"GPU": 0.25}
    assert worker_resources(packed, use_gpu=False) == {"CPU": 1.0}
