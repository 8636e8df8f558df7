"""What actually listens: a local run's Ray and `cluster/local_head.sh` open ports on 127.0.0.1 only, behind a token.

Each test starts one real Ray (~10 s) and lists, with psutil, the listening TCP sockets of every process it started
(the head or driver and all its descendants: GCS, raylet, dashboard, agents, workers). The suite's environment says
RAY_AUTH_MODE=disabled: a local run closes its Ray regardless, and the head's default is token auth.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from personalization.config import build_config, replace
from pipelines.common import ray_session
from pipelines.local_ray import MALLOC_TUNABLES

ROOT = Path(__file__).resolve().parents[2]


def listening(pid: int) -> dict[str, set[tuple[str, int]]]:
    """{process name: {(ip, port)}} of the TCP sockets that ``pid`` and its descendants listen on."""
    root = psutil.Process(pid)
    found: dict[str, set[tuple[str, int]]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            sockets = proc.net_connections(kind="tcp")
        except psutil.Error:  # a worker that ended meanwhile
            continue
        for conn in sockets:
            if conn.status == psutil.CONN_LISTEN:
                found.setdefault(name, set()).add((conn.laddr.ip, conn.laddr.port))
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def settled(pid: int, wanted: set[int], timeout: float = 30) -> dict[str, set[tuple[str, int]]]:
    """The listening sockets once every port in ``wanted`` and the dashboard agent's listen (agents start last)."""
    deadline = time.monotonic() + timeout
    while True:
        found = listening(pid)
        ports = {port for sockets in found.values() for _, port in sockets}
        if (wanted <= ports and "ray::DashboardAgent" in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def off_loopback(found: dict[str, set[tuple[str, int]]]) -> list[str]:
    return sorted(
        f"{name} {ip}:{port}" for name, sockets in found.items() for ip, port in sockets if not is_loopback(ip)
    )


def test_local_run_listens_on_loopback_only_and_its_jobs_api_needs_the_token(monkeypatch, no_ray_in_process):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # what `make test` and the suite's conftest set
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    cfg = replace(build_config(), **{"ray.num_cpus": 2})
    with ray_session(cfg):
        worker_env = ray.get(ray.remote(lambda: dict(os.environ)).remote())  # starts a worker
        assert worker_env["RAY_AUTH_MODE"] == "token"
        assert worker_env["GLIBC_TUNABLES"] == MALLOC_TUNABLES  # the run's malloc settings reach its workers
        node = ray._private.worker._global_node
        gcs_port = int(node.gcs_address.rsplit(":", 1)[1])
        dashboard = f"http://{node.webui_url}"
        raylet = ray.nodes()[0]
        wanted = {gcs_port, int(node.webui_url.rsplit(":", 1)[1]), raylet["NodeManagerPort"]}
        found = settled(os.getpid(), wanted | {raylet["ObjectManagerPort"]})
        ports = {port for sockets in found.values() for _, port in sockets}
        assert wanted <= ports and {"gcs_server", "raylet", "ray::DashboardAgent"} <= set(found), found
        assert off_loopback(found) == [], found

        token = os.environ["RAY_AUTH_TOKEN"]
        token_file = Path(node.get_session_dir_path()) / "auth_token"
        assert token_file.read_text().strip() == token and len(token) == 64
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert requests.get(f"{dashboard}/api/jobs/", timeout=10).status_code == 401
        assert requests.post(f"{dashboard}/api/jobs/", json={"entrypoint": "id"}, timeout=10).status_code == 401
        wrong = {"Authorization": f"Bearer {'0' * 64}"}
        assert requests.get(f"{dashboard}/api/jobs/", headers=wrong, timeout=10).status_code == 403
        right = {"Authorization": f"Bearer {token}"}
        assert requests.get(f"{dashboard}/api/jobs/", headers=right, timeout=10).status_code == 200
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ  # put back
    assert "GLIBC_TUNABLES" not in os.environ
    assert not token_file.exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def head_env():
    """cluster/local_head.sh settings: its own short state folder (Ray's socket paths) and free ports."""
    folder = tempfile.mkdtemp(prefix="rp", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}  # the script's default: token
    ports = {name: str(free_port()) for name in ("HEAD", "DASHBOARD", "CLIENT", "AGENT")}
    env |= {f"RAY_{name}_PORT": port for name, port in ports.items()}
    env |= {"RAY_HEAD_DIR": folder, "RAY_HEAD_NUM_CPUS": "2", "RAY_USAGE_STATS_ENABLED": "0"}
    yield env
    script(env, "stop")
    shutil.rmtree(folder, ignore_errors=True)


def script(env: dict, command: str) -> subprocess.CompletedProcess:
    local_head = ROOT / "cluster" / "local_head.sh"
    return subprocess.run([str(local_head), command], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)


def test_local_head_listens_on_loopback_only_and_needs_its_token(head_env):
    started = script(head_env, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    folder = Path(head_env["RAY_HEAD_DIR"])
    token_file = folder / "auth_token"
    assert f"RAY_AUTH_TOKEN_PATH={token_file}" in started.stdout  # how clients get the token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700

    wanted = {int(head_env[f"RAY_{name}_PORT"]) for name in ("HEAD", "DASHBOARD", "CLIENT", "AGENT")}
    found = settled(int((folder / "head.pid").read_text()), wanted)
    ports = {port for sockets in found.values() for _, port in sockets}
    assert wanted <= ports and {"gcs_server", "raylet", "ray::DashboardAgent"} <= set(found), found
    assert off_loopback(found) == [], found

    jobs = f"http://127.0.0.1:{head_env['RAY_DASHBOARD_PORT']}/api/jobs/"
    assert requests.get(jobs, timeout=10).status_code == 401
    token = token_file.read_text().strip()
    assert requests.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    stopped = script(head_env, "stop")
    assert "stopped the Ray head" in stopped.stdout
    survivors = [p.pid for p in psutil.process_iter(["cmdline"]) if str(folder) in " ".join(p.info["cmdline"] or [])]
    assert survivors == []
