"""A private local Ray for one run, closed to the other users and machines that can reach this host.

Ray 2.60 started by ``ray.init(address="local")`` on Linux listens on every interface (GCS, raylet, workers,
dashboard agent), and anyone who reaches its Jobs API or GCS runs code as you. Here, for the run's own Ray:

- ``RAY_AUTH_MODE=token`` with a fresh random token made for this run (``RAY_AUTH_TOKEN`` in this process's
  environment, inherited by every Ray process it starts); whatever the caller's environment held is put back after.
- the node IP is 127.0.0.1: Ray binds its gRPC servers, the dashboard agent and the Ray Client server to the node
  IP when that is loopback. Ray turns a 127.0.0.1 node IP into the host's address unless
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode, the default on macOS). Ray reads that flag when
  it is imported, so it is set in the environment (for the Ray processes started here) and on the already imported
  constant of this process while ``ray.init`` runs.

It also hands every process of that Ray glibc malloc settings for torch on CPU (:data:`MALLOC_TUNABLES`), and turns
off Ray Train's preemption watcher, which has nothing to watch on one machine.

Both use Ray 2.60 internals (``ray._raylet.Config``, the token loader, ``ray_constants``); the pin is exact and
tests/reliability/test_ports.py checks what actually listens, so a Ray upgrade that changes them fails there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"
_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
# glibc's malloc for torch on CPU: by default every tensor over 128 KiB-32 MiB is a fresh mmap, page-faulted in and
# zeroed by the kernel on every use and unmapped on free, and a Ray worker's task thread gets its own arena, whose
# large blocks are mmaps whatever the threshold. One arena, and blocks up to 1 GiB kept and reused: a MobileNetV2
# LoRA step at 224 px (3 x 16 images) on one thread took 1.6 s instead of 2.9 s, 38% of it kernel time before
# (benchmarks/RESULTS.md). Processes keep their peak memory instead of handing it back. glibc reads it at process
# start, so it is set in the environment Ray's processes inherit; a GLIBC_TUNABLES already set (even empty) wins.
# cluster/runtime_env.yaml sets the same for jobs on a cluster. Other C libraries (macOS, musl) ignore it.
MALLOC_TUNABLES = (
    "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824:glibc.malloc.arena_max=1"
)
# The environment a local Ray's processes get unless the caller set these already (even empty). Ray Train's
# preemption watcher (one more actor process per training run, ~3 s of CPU to start) watches for an autoscaler
# draining a node, which a one-machine Ray never does. Its controller polls the workers every 2 s by default, so a
# run that has finished waits a second on average before it returns; every 0.5 s costs a few ms of CPU.
PROCESS_DEFAULTS = {
    "GLIBC_TUNABLES": MALLOC_TUNABLES,
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def _reload_auth_settings() -> None:
    """Make this process's Ray see the current RAY_AUTH_* variables (Ray caches both the mode and the token)."""
    from ray._raylet import AuthenticationTokenLoader, Config  # ray stays out of light commands (common imports us)

    Config.initialize("")  # the mode first: a cached token mode with no token left would abort Ray
    AuthenticationTokenLoader.instance().reset_cache()


def save_token(token: str, folder: str) -> Path:
    """``folder/auth_token`` holding the token, readable by this user only (what the dashboard asks for)."""
    path = Path(folder) / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return path


@contextlib.contextmanager
def closed_local_ray(**init_kwargs) -> Iterator[tuple]:
    """``ray.init(address="local", **init_kwargs)`` with token auth and every port on loopback.

    Yields ``(ray context, token file)``. The dashboard (when ``include_dashboard``) listens on 127.0.0.1 and asks
    for the token, which is saved in the session folder as ``auth_token`` (mode 600) and removed at the end. Ray is
    shut down on exit.
    """
    import ray  # imported here, not above: pipelines.common imports this module, and light commands import it
    from ray._private import ray_constants

    saved = {name: os.environ.get(name) for name in (*_VARS, *PROCESS_DEFAULTS)}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"
    )
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)
    token_file = None
    try:
        _reload_auth_settings()
        multi_node, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            context = ray.init(address="local", _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **init_kwargs)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
        try:
            token_file = save_token(os.environ["RAY_AUTH_TOKEN"], context.address_info["session_dir"])
            yield context, token_file
        finally:
            ray.shutdown()
    finally:
        if token_file is not None:
            token_file.unlink(missing_ok=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload_auth_settings()
