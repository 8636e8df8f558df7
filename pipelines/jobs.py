"""Send a `personalize` command to a running Ray cluster as a Ray Job, and follow its logs.

``personalize --address http://HEAD:8265 run --config configs/demo.yaml ...`` is the same as::

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \\
        -- personalize run --config configs/demo.yaml ...

The address is the head's dashboard / Jobs API (HTTP, port 8265 by default), not the ``ray://`` client port.
The working directory (by default this checkout: the folder holding its pyproject.toml, wherever the command is run
from) is zipped and uploaded with the job, so the cluster runs this code; the cluster's Python must already hold the
pinned dependencies and the ``personalize`` script (cluster/README notes).

Token auth (Ray >= 2.52; a cluster started with ``RAY_AUTH_MODE=token``): the client sends
``Authorization: Bearer <token>``. The token comes from, in order: ``submit(token=...)``, ``RAY_AUTH_TOKEN``,
the file named by ``RAY_AUTH_TOKEN_PATH``, and, when ``RAY_AUTH_MODE=token``, ``~/.ray/auth_token``
(what ``ray get-auth-token`` prints). The same variables work for ``ray job submit``. A token is sent over plain
``http://`` only to a loopback host (127.0.0.1, ::1, localhost: a local head, or an SSH tunnel / port-forward to
one); anywhere else it needs ``https://`` or an explicit ``--insecure``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import requests
import yaml

from pipelines.local_ray import MALLOC_TUNABLES

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
START_HINT = "start a local head with `cluster/local_head.sh start`, or check the address (ray status on the head)"
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # this checkout: the folder holding pyproject.toml


class ClusterError(ValueError):
    """The cluster cannot be used as asked (no answer, missing or wrong token, bad address): a user error."""


def normalize_address(address: str) -> str:
    """``host:port`` -> ``http://host:port``; a ``ray://`` client address is refused with the fix."""
    address = (address or "").strip().rstrip("/")
    if not address:
        raise ClusterError("--address is empty; pass the head's Jobs API, e.g. --address http://127.0.0.1:8265")
    if address.startswith("ray://"):
        raise ClusterError(
            f"--address {address}: that is the Ray Client port; jobs go to the dashboard's HTTP address, "
            "e.g. http://HEAD:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address}: expected http://HOST:PORT (the head's dashboard / Jobs API)")
    return address


def load_token(token: str | None = None) -> str | None:
    """The cluster token to send, by the precedence in the module docstring; None when there is none."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not Path(path).is_file():
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: no such file; point it at the file holding the token")
        return Path(path).read_text().strip()
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        return default.read_text().strip()
    return None


def is_loopback(address: str) -> bool:
    """Whether the address's host is this machine (127.0.0.0/8, ::1 or ``localhost``): plain HTTP never leaves it."""
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_transport(address: str, token: str | None, insecure: bool = False) -> None:
    """Refuse to send a token in clear text (``http://``) to another machine, unless the user said ``--insecure``."""
    if token and address.startswith("http://") and not is_loopback(address) and not insecure:
        raise ClusterError(
            f"--address {address}: the cluster token would cross the network unencrypted (plain http to a host that "
            "is not this machine). Use https://HEAD (a TLS proxy in front of the dashboard), or an SSH tunnel / "
            "port-forward to 127.0.0.1 (`ssh -L 8265:127.0.0.1:8265 HEAD` or `kubectl port-forward svc/HEAD 8265`, "
            "then --address http://127.0.0.1:8265), or pass --insecure if this network is trusted"
        )


def check_cluster(address: str, token: str | None = None, timeout: float = 5.0) -> str:
    """Ask the Jobs API for its Ray version, within ``timeout`` seconds; a clear ClusterError if it cannot answer.

    The SDK's own check has no timeout (a silent address would hang for minutes), and its auth errors do not
    say which variable to set: this check does both. Returns the cluster's Ray version.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        reply = requests.get(f"{address}/api/version", headers=headers, timeout=(timeout, timeout))
    except requests.exceptions.RequestException as error:
        raise ClusterError(f"no Ray cluster answers at {address} ({type(error).__name__}); {START_HINT}") from None
    if reply.status_code == 401:
        raise ClusterError(
            f"the cluster at {address} requires a token (RAY_AUTH_MODE=token on the cluster) and none was sent: "
            "set RAY_AUTH_TOKEN (e.g. `export RAY_AUTH_TOKEN=$(ray get-auth-token)` on a machine holding the "
            "cluster's token) or RAY_AUTH_TOKEN_PATH=FILE"
        )
    if reply.status_code == 403:
        raise ClusterError(
            f"the cluster at {address} rejected the token: RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token "
            "holds a different token than the cluster's"
        )
    if reply.status_code != 200:
        raise ClusterError(f"{address}/api/version answered HTTP {reply.status_code}: is this a Ray dashboard?")
    return reply.json().get("ray_version", "?")


def connect(address: str, token: str | None = None, insecure: bool = False):
    """A ``JobSubmissionClient`` for ``address`` after a transport, reachability and auth check."""
    from ray.job_submission import JobSubmissionClient  # ~1.5 s to import: not before the arguments are checked

    address = normalize_address(address)
    token = load_token(token)
    check_transport(address, token, insecure)
    check_cluster(address, token)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def load_runtime_env(path: str | Path | None, working_dir: str | Path | None) -> dict:
    """The runtime env YAML (or {}) with ``working_dir`` set to an absolute local folder (uploaded by the SDK), and
    the malloc settings a local run gives its processes (``GLIBC_TUNABLES``, :data:`MALLOC_TUNABLES`) unless the
    YAML's ``env_vars`` set their own."""
    env: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--runtime-env {path}: no such file (the shipped one is cluster/runtime_env.yaml)")
        env = yaml.safe_load(path.read_text()) or {}
        if not isinstance(env, dict):
            raise ClusterError(f"{path}: a runtime env must be a mapping (env_vars, excludes, pip, ...)")
    if not isinstance(env.setdefault("env_vars", {}), dict):
        raise ClusterError(f"{path}: env_vars must be a mapping of names to strings")
    env["env_vars"].setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    if working_dir is not None:
        folder = Path(working_dir).resolve()
        if folder == PROJECT_ROOT and not (folder / "pyproject.toml").is_file():
            raise ClusterError(
                f"{folder} holds no pyproject.toml (personalize is installed, not run from a checkout): pass "
                "--working-dir FOLDER (the checkout to upload)"
            )
        if not folder.is_dir():
            raise FileNotFoundError(f"--working-dir {working_dir}: no such folder")
        env["working_dir"] = str(folder)
    return env


def follow_job(client, job_id: str, out: TextIO | None = None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to ``out`` until it ends; return its final status (SUCCEEDED, FAILED, STOPPED)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception:  # websocket refused (proxy, old server): fall back to polling the full log
        shown = 0
        while True:
            status = str(client.get_job_status(job_id).value)
            logs = client.get_job_logs(job_id)
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
            if status in TERMINAL:
                break
            time.sleep(poll_s)
    # The log stream closes a moment before the status turns terminal.
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def submit(
    address: str,
    entrypoint_argv: Sequence[str],
    *,
    working_dir: str | Path | None = PROJECT_ROOT,
    runtime_env_path: str | Path | None = None,
    follow: bool = True,
    token: str | None = None,
    insecure: bool = False,
) -> str:
    """Submit ``entrypoint_argv`` (e.g. ``["personalize", "run", "--config", ...]``) as a Ray Job; return its id.

    With ``follow`` the call streams the job's logs until it ends and prints its final status; get the status
    itself with ``job_status``. ``working_dir=None`` uploads nothing (the cluster's own files are used);
    ``insecure`` allows sending the token over plain http to another machine.
    """
    if not entrypoint_argv:
        raise ClusterError("no command to submit; e.g. `personalize --address URL run --config configs/demo.yaml`")
    client = connect(address, token, insecure)
    runtime_env = load_runtime_env(runtime_env_path, working_dir)
    entrypoint = shlex.join(entrypoint_argv)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None)
    where = normalize_address(address)
    print(f"submitted job {job_id} to {where}: {entrypoint}")
    print(f"  logs: ray job logs --address {where} -f {job_id}   stop: ray job stop --address {where} {job_id}")
    if follow:
        status = follow_job(client, job_id)
        print(f"job {job_id}: {status}")
    return job_id


def job_status(address: str, job_id: str, token: str | None = None, insecure: bool = False) -> str:
    """The job's current status name: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(connect(address, token, insecure).get_job_status(job_id).value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="personalize --address URL",
        description="Run a personalize command on a Ray cluster as a Ray Job (the Jobs API at URL).",
    )
    parser.add_argument("--address", required=True, help="the head's dashboard / Jobs API, e.g. http://127.0.0.1:8265")
    parser.add_argument("--no-follow", action="store_true", help="submit and return; do not stream the logs")
    parser.add_argument("--runtime-env", help="runtime env YAML, e.g. cluster/runtime_env.yaml")
    parser.add_argument("--working-dir", default=PROJECT_ROOT, help=f"folder uploaded with the job [{PROJECT_ROOT}]")
    parser.add_argument(
        "--insecure", action="store_true", help="allow sending the token over plain http to another machine"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the personalize command and its arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``personalize --address URL [--no-follow] [--runtime-env FILE] [--working-dir DIR] [--insecure] COMMAND ...``.

    Exit status: 0 when the job SUCCEEDED (or was submitted, with --no-follow), 1 when it failed or was stopped,
    2 for bad input (no answer at the address, missing token, ...).
    """
    args = build_parser().parse_args(argv)
    if not args.command:
        print("personalize --address: no command given, e.g. `run --config configs/demo.yaml`", file=sys.stderr)
        return 2
    argv_job = ["personalize", *args.command]
    try:
        job_id = submit(
            args.address,
            argv_job,
            working_dir=args.working_dir,
            runtime_env_path=args.runtime_env,
            follow=not args.no_follow,
            insecure=args.insecure,
        )
        if args.no_follow:
            return 0
        return 0 if job_status(args.address, job_id, insecure=args.insecure) == "SUCCEEDED" else 1
    except (ClusterError, FileNotFoundError) as error:
        print(f"personalize --address: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped following; the job keeps running (`ray job stop --address URL JOB_ID` ends it)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
