"""Access: what the shipped cluster files expose, and that secrets never reach configs, outputs or logs."""

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import yaml

from personalization.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SECRET_NAMES = re.compile(r"key|token|secret|password|passwd|credential|auth", re.IGNORECASE)


def test_local_head_binds_to_localhost_with_token_auth_by_default():
    """The flags behind what tests/reliability/test_ports.py observes (every port on 127.0.0.1, token by default)."""
    script = (CLUSTER / "local_head.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"--dashboard-host[ =]127\.0\.0\.1", code)
    assert re.search(r"--node-ip-address[ =]127\.0\.0\.1", code)
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in code  # else Ray swaps 127.0.0.1 for the host's address
    assert 'RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in code
    assert "0.0.0.0" not in code
    assert re.search(r"--temp-dir", code)  # its sockets live in its own folder, not a shared /tmp/ray


def test_cluster_launcher_starts_every_node_with_token_auth():
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    head = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert re.search(r"--dashboard-host[ =]127\.0\.0\.1", head)


def _containers(node) -> list[dict]:
    found = []
    if isinstance(node, dict):
        if "containers" in node:
            found += node["containers"]
        for value in node.values():
            found += _containers(value)
    elif isinstance(node, list):
        for value in node:
            found += _containers(value)
    return found


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_pods_run_with_token_auth_from_a_secret(name):
    documents = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    containers = [c for d in documents for c in _containers(d)]
    ray_nodes = [c for c in containers if c.get("name", "").startswith("ray") or "ray" in c.get("image", "")]
    assert ray_nodes, f"{name}: no Ray containers found"
    for container in ray_nodes:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}: {container.get('name')}"
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "valueFrom" in token and "value" not in token, f"{name}: the token must come from a Secret"


def _fields(cls, prefix=""):
    for field in dataclasses.fields(cls):
        yield prefix + field.name
        if dataclasses.is_dataclass(field.type) or (
            isinstance(field.type, type) and dataclasses.is_dataclass(field.type)
        ):
            yield from _fields(field.type, prefix + field.name + ".")
        elif field.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(field.default_factory):
            yield from _fields(field.default_factory, prefix + field.name + ".")


def test_no_config_field_holds_a_secret():
    """Secrets come from the environment only: no config field (saved beside every output) could hold one."""
    names = list(_fields(ExperimentConfig))
    assert len(names) > 40 and "train.epochs" in names
    assert [n for n in names if SECRET_NAMES.search(n.rsplit(".", 1)[-1])] == []


def test_secrets_in_the_environment_never_reach_outputs_or_logs(toy, tmp_path, monkeypatch, capsys, caplog):
    from pipelines import cli

    secrets = {name: f"s3cr3t-{name.lower()}-0123456789" for name in ("HF_TOKEN", "OPENAI_API_KEY", "RAY_AUTH_TOKEN")}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    assert cli.main(["ingest", f"data.root={toy}", f"output_dir={out}"]) == 0
    captured = capsys.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err, "log": caplog.text}
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()}
    leaks = [(where, name) for where, text in texts.items() for name, value in secrets.items() if value in text]
    assert leaks == [] and any(p.name == "config.yaml" for p in out.rglob("*"))


@pytest.mark.parametrize("address", ["http://10.0.0.7:8265", "192.0.2.1:8265", "http://head.example.org:8265"])
def test_token_over_plain_http_to_another_host_is_refused(address, monkeypatch, capsys):
    """Refused before anything is sent (the hosts do not answer here: a send would time out, not fail fast)."""
    from pipelines import cli, jobs

    with pytest.raises(jobs.ClusterError, match="unencrypted") as error:
        jobs.connect(address, token="t0ken")
    for fix in ("https://", "ssh -L 8265:127.0.0.1:8265", "--insecure"):
        assert fix in str(error.value)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0ken")
    assert cli.main(["--address", address, "run", "--config", "configs/demo.yaml"]) == 2
    assert "--insecure" in capsys.readouterr().err
    jobs.check_transport(jobs.normalize_address(address), "t0ken", insecure=True)  # the user's explicit choice


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265"])
def test_token_over_plain_http_to_this_machine_passes_the_transport_check(address):
    from pipelines import jobs

    jobs.check_transport(address, "t0ken")
    jobs.check_transport("https://head.example.org:8265", "t0ken")
    jobs.check_transport("http://10.0.0.7:8265", None)  # no token, nothing secret to send


def test_insecure_flag_reaches_the_job_client(capsys):
    """`personalize --insecure --address ...` is routed to the job client (here: nothing answers, exit 2)."""
    import socket

    from pipelines import cli

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert cli.main(["--insecure", "--address", f"http://127.0.0.1:{port}", "ingest"]) == 2
    assert "no Ray cluster answers" in capsys.readouterr().err


def test_working_dir_defaults_to_the_checkout_not_the_current_folder(tmp_path, monkeypatch):
    from pipelines import jobs

    monkeypatch.chdir(tmp_path)
    args = jobs.build_parser().parse_args(["--address", "http://127.0.0.1:8265", "run"])
    assert Path(args.working_dir) == ROOT and (ROOT / "pyproject.toml").is_file()
    assert jobs.load_runtime_env(None, args.working_dir)["working_dir"] == str(ROOT)
    assert jobs.load_runtime_env(None, ".")["working_dir"] == str(tmp_path)  # an explicit folder is kept


def test_jobs_get_the_local_runs_malloc_settings_unless_their_runtime_env_sets_its_own(tmp_path):
    from pipelines import jobs
    from pipelines.local_ray import MALLOC_TUNABLES

    assert jobs.load_runtime_env(None, None) == {"env_vars": {"GLIBC_TUNABLES": MALLOC_TUNABLES}}
    own = tmp_path / "env.yaml"
    own.write_text("env_vars:\n  GLIBC_TUNABLES: ''\n  HF_HOME: /mnt/hf\n")
    assert jobs.load_runtime_env(own, None)["env_vars"] == {"GLIBC_TUNABLES": "", "HF_HOME": "/mnt/hf"}
    own.write_text("env_vars: [HF_HOME]\n")
    with pytest.raises(jobs.ClusterError, match="env_vars must be a mapping"):
        jobs.load_runtime_env(own, None)


def test_working_dir_default_without_a_checkout_asks_for_one(tmp_path, monkeypatch):
    """Installed from a wheel, pipelines/.. holds no pyproject.toml: say so rather than upload site-packages."""
    from pipelines import jobs

    monkeypatch.setattr(jobs, "PROJECT_ROOT", tmp_path)
    with pytest.raises(jobs.ClusterError, match="--working-dir FOLDER"):
        jobs.load_runtime_env(None, tmp_path)
