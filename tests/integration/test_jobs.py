"""`personalize` as a Ray Job on a real local head that this test starts (cluster/local_head.sh) and stops by PID.

The head gets free ports and its own short temp dir, so it never meets another Ray on the machine; teardown
checks that no process of it survives. The job's entrypoint is one parameter (JOB_ENTRYPOINTS): two stages chained,
`personalize run` end to end (its summary.json records the job id), and a stage session joining the cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests
import yaml

from pipelines import jobs

ROOT = Path(__file__).resolve().parents[2]
LOCAL_HEAD = ROOT / "cluster" / "local_head.sh"

pytestmark = pytest.mark.slow  # each head takes ~10 s to start and a job ~10 s on a shared 2-CPU machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def head_processes(head_dir: str) -> list[int]:
    """PIDs of live processes whose command line names the head's folder (every Ray process of that head does)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if head_dir in cmdline and "pytest" not in cmdline:
            pids.append(int(proc.name))
    return pids


class LocalHead:
    """cluster/local_head.sh driven with env overrides: free ports, a private folder, 2 CPUs."""

    def __init__(self, auth_mode: str = "disabled", token: str | None = None):
        # Short path: Ray's unix sockets live under it and socket paths max out near 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        self.dashboard_port = free_port()
        self.env = {
            **os.environ,
            "RAY_HEAD_DIR": self.dir,
            "RAY_HEAD_PORT": str(free_port()),
            "RAY_DASHBOARD_PORT": str(self.dashboard_port),
            "RAY_CLIENT_PORT": str(free_port()),
            "RAY_AGENT_PORT": str(free_port()),
            "RAY_HEAD_NUM_CPUS": "2",
            "RAY_AUTH_MODE": auth_mode,
        }
        self.env.pop("RAY_AUTH_TOKEN", None)
        if token:
            self.env["RAY_AUTH_TOKEN"] = token
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def script(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(LOCAL_HEAD), command], env=self.env, capture_output=True, text=True, timeout=180, cwd=ROOT
        )

    def start(self) -> LocalHead:
        done = self.script("start")
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"local_head.sh start failed:\n{done.stdout}\n{done.stderr}")
        assert self.address in done.stdout  # it prints the dashboard / submit address
        return self

    def stop(self) -> None:
        self.script("stop")
        leftover = head_processes(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not leftover, f"processes of the test's Ray head survived `local_head.sh stop`: {leftover}"


@pytest.fixture(scope="module")
def head():
    local = LocalHead().start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def runtime_env_file(tmp_path: Path) -> Path:
    """The shipped cluster/runtime_env.yaml, with the HF cache moved from the shared mount to a temp folder."""
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    env["env_vars"]["HF_HOME"] = str(tmp_path / "hf")
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


def toy_ingest(tmp: Path) -> list[str]:
    """make-toy then ingest: two stages, chained in one job."""
    toy, out = tmp / "toy", tmp / "out"
    script = (
        f"personalize make-toy --out {toy} --size 48 --categories mug,tote --val-per-category 1 "
        f"--test-per-category 1 --test-per-split 1 --dense-per-instance 1 "
        f"&& personalize ingest data.root={toy} output_dir={out}"
    )
    return ["bash", "-c", script]


def toy_run(tmp: Path) -> list[str]:
    """`personalize run` end to end as a Ray Job: toy benchmark + tiny DINOv2 from the zoo, every stage."""
    toy, out, zoo = tmp / "toy", tmp / "out", tmp / "zoo"
    script = (
        f"personalize make-toy --out {toy} --size 48 --categories mug,tote --val-per-category 1 "
        f"--test-per-category 1 --test-per-split 1 --dense-per-instance 1 "
        f"&& personalize zoo --out {zoo} --parts dinov2 "
        f"&& personalize run --config configs/demo.yaml data.root={toy} output_dir={out} "
        f"model.backbone=dinov2_vitb14 model.weights={zoo}/dinov2 model.image_size=56 train.num_triplets=16 "
        f"train.batch_size=8 cutpaste.images_per_instance=4 cutpaste.image_size=48 evaluate.dense_image_size=56 "
        f"evaluate.num_actors=1"
    )
    return ["bash", "-c", script]


def stage_session_joins_cluster(tmp: Path) -> list[str]:
    """A stage's ray_session inside a job must join the job's cluster (RAY_ADDRESS), not start a private Ray."""
    code = (
        "import os, ray; from personalization.config import build_config; from pipelines.common import ray_session\n"
        "with ray_session(build_config()):\n"
        "    assert ray.get_runtime_context().gcs_address == os.environ['RAY_ADDRESS'], os.environ['RAY_ADDRESS']\n"
        f"open({str(tmp / 'joined')!r}, 'w').write(ray.__version__)\n"
    )
    return ["python", "-c", code]


# (entrypoint maker, the file or the folder (then holding a _manifest.json) that the job must leave behind)
JOB_ENTRYPOINTS = {
    "toy_ingest": (toy_ingest, "out/ingest"),
    "toy_run": (toy_run, "out/evaluate"),
    "ray_session": (stage_session_joins_cluster, "joined"),
}


@pytest.mark.parametrize("name", list(JOB_ENTRYPOINTS))
def test_job_on_local_head_succeeds_and_is_listed(head, runtime_env_file, tmp_path, name, capsys):
    make_entrypoint, manifest_dir = JOB_ENTRYPOINTS[name]
    job_id = jobs.submit(
        head.address, make_entrypoint(tmp_path), working_dir=ROOT, runtime_env_path=runtime_env_file, follow=True
    )
    printed = capsys.readouterr().out
    assert jobs.job_status(head.address, job_id) == "SUCCEEDED", printed
    assert f"job {job_id}: SUCCEEDED" in printed
    if (tmp_path / manifest_dir).is_dir():
        manifest = json.loads((tmp_path / manifest_dir / "_manifest.json").read_text())
        assert manifest["stage"] == manifest_dir.split("/")[-1]
    else:
        assert (tmp_path / manifest_dir).is_file()

    if name == "toy_run":  # the run's summary names the job that made it
        assert json.loads((tmp_path / "out" / "summary.json").read_text())["job_id"] == job_id

    listed = requests.get(f"{head.address}/api/jobs/", timeout=10).json()
    entry = next(job for job in listed if job["submission_id"] == job_id)
    assert entry["status"] == "SUCCEEDED"
    assert entry["runtime_env"]["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_cli_reports_a_failed_job(head, tmp_path, capsys):
    """`personalize --address URL ingest ...` with a bad data.root: the job fails and main() says so (exit 1)."""
    missing = tmp_path / "no_such_dataset"
    code = jobs.main(["--address", head.address, "ingest", f"data.root={missing}", f"output_dir={tmp_path}"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in printed
    assert "data.root" in printed  # the stage's own config error reaches the submitter through the log stream


def test_unanswered_address_is_a_clear_error(capsys):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(jobs.ClusterError, match="no Ray cluster answers at") as error:
        jobs.submit(address, ["personalize", "run"], follow=False)
    assert address in str(error.value) and "cluster/local_head.sh start" in str(error.value)
    assert jobs.main(["--address", address, "run", "--config", "configs/demo.yaml"]) == 2
    assert "cluster/local_head.sh start" in capsys.readouterr().err


def test_ray_client_address_is_refused():
    with pytest.raises(jobs.ClusterError, match="Ray Client port"):
        jobs.normalize_address("ray://127.0.0.1:10001")
    assert jobs.normalize_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"


def test_token_cluster_needs_the_token(monkeypatch, tmp_path):
    """A head with RAY_AUTH_MODE=token: no token -> error naming RAY_AUTH_TOKEN; wrong -> rejected; right -> ok."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    token = secrets.token_hex(16)
    local = LocalHead(auth_mode="token", token=token).start()
    try:
        with pytest.raises(jobs.ClusterError, match="requires a token") as error:
            jobs.submit(local.address, ["personalize", "run"], follow=False)
        assert "RAY_AUTH_TOKEN" in str(error.value)
        with pytest.raises(jobs.ClusterError, match="rejected the token"):
            jobs.connect(local.address, token="not-" + token)
        assert requests.get(f"{local.address}/api/jobs/", timeout=10).status_code == 401

        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        client = jobs.connect(local.address)
        assert client.list_jobs() == []
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
        assert jobs.load_token() == token
        assert jobs.check_cluster(local.address, jobs.load_token()) == "2.60.0"
    finally:
        local.stop()
