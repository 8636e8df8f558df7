import os

import pytest

from pipelines.local_ray import PROCESS_DEFAULTS

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: with Ray workers, subprocess runs or another user's jobs on the
# same cores, spinning intra-op threads starve the threads they wait for (a unit test took 50-100 s instead of 15
# under a load of 5 on 2 cores). Read by libgomp when torch loads, so it is set before any test imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# What a local `personalize` Ray gives its processes (pipelines/local_ray.py: malloc settings, no preemption
# watcher), for the suite's Ray and the processes it starts too; the Makefile sets GLIBC_TUNABLES for the pytest
# process itself (glibc reads it at start).
for name, value in PROCESS_DEFAULTS.items():
    os.environ.setdefault(name, value)
# `make test` runs two pytest-xdist workers, each with Rays of its own: a worker's Rays (and the `personalize`
# commands it starts) keep their sessions, sockets and current-cluster file in a folder of that worker's, so an
# `address="auto"` in one worker never finds the other's Ray.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/pytest-ray-{worker}")
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """``tiny_zoo(parts)`` -> ``{part: path}``: personalization.zoo's tiny random models, each built once per session
    into one folder (``build_zoo`` finds a built part by its marker) and only read by the tests."""
    from personalization.zoo import build_zoo

    root = tmp_path_factory.mktemp("zoo")
    return lambda parts=None: build_zoo(root, parts=parts)


def start_local_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    """A local 2-CPU Ray for the whole session, started here and shut down here (never attaches elsewhere)."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray_in_process():
    """For a test that starts its own Ray in this process: the session's Ray (if up) is stopped first and
    started again after, so the test sees what a fresh `personalize run` sees."""
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if was_up:
        start_local_ray()
