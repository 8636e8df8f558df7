"""Every file under cluster/ parses, says what the cluster needs, and the `personalize` commands it shows are valid.

The commands are checked with the project's own config loader, so a renamed config field breaks this test rather
than a user's first cluster run.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from personalization.config import load_config
from pipelines.cli import COMMANDS
from pipelines.local_ray import MALLOC_TUNABLES

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
STAGES_WITH_CONFIG = {"ingest", "dreambooth", "generate", "filter", "cutpaste", "train", "evaluate", "run"}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def personalize_commands(text: str) -> list[list[str]]:
    """`personalize ... STAGE --config X k=v ...` command lines in a file, comments and continuations included.

    Returns each as the argv after the stage name; global options (--address, --runtime-env) are dropped.
    """
    # Join shell continuations: "... \\\n#       more" -> "... more".
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    found = []
    for line in text.splitlines():
        for match in re.finditer(r"(?:^|[\s`>-])personalize\s+(.*)", line):
            words = shlex.split(match.group(1).split("`")[0], comments=False)
            while words and words[0] in ("--address", "--runtime-env", "--no-follow"):
                words = words[1:] if words[0] == "--no-follow" else words[2:]
            if words and words[0] in STAGES_WITH_CONFIG and "--config" in words:
                found.append(words)
    return found


def check_command(words: list[str], tmp_path: Path) -> None:
    """The stage exists and its --config + overrides build a valid ExperimentConfig.

    data.root is swapped for an existing folder: the config checks that the dataset exists, and the cluster paths
    (/mnt/shared/...) do not exist here.
    """
    stage, rest = words[0], words[1:]
    assert stage in COMMANDS, f"unknown command {stage}"
    config = rest[rest.index("--config") + 1]
    overrides = [w for w in rest if "=" in w and not w.startswith("-")]
    overrides = [f"data.root={tmp_path}" if w.startswith("data.root=") else w for w in overrides]
    assert (ROOT / config).is_file(), f"{config} does not exist"
    cfg = load_config(ROOT / config, overrides)
    for word in overrides:
        key, value = word.split("=", 1)
        if key == "output_dir":
            assert cfg.output_dir == value
            assert value.startswith("/mnt/"), "cluster outputs must go to the shared mount"


def test_there_are_cluster_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAMLS}
    assert {"runtime_env.yaml", "cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses_and_its_commands_are_valid(path, tmp_path):
    assert load_docs(path), f"{path} holds no YAML document"
    for words in personalize_commands(path.read_text()):
        check_command(words, tmp_path)


def test_runtime_env_is_a_valid_ray_runtime_env():
    env = load_docs(CLUSTER / "runtime_env.yaml")[0]
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own validation of every field
    for heavy in (".venv/", "outputs/", "models/", ".git/"):
        assert heavy in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env var values must be strings"
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["env_vars"]["HF_HOME"].startswith("/mnt/shared")
    assert env["env_vars"]["GLIBC_TUNABLES"] == MALLOC_TUNABLES  # the local run's malloc settings, on the cluster
    assert "working_dir" not in env  # given by --working-dir / personalize --address
    text = (CLUSTER / "runtime_env.yaml").read_text()
    assert "py_executable" in text and "pip:" in text  # both install options documented
    commands = personalize_commands(text)
    assert [w[0] for w in commands] == ["run", "run"]  # the `ray job submit` and `personalize --address` forms


def test_the_makefile_gives_the_suite_the_runs_malloc_settings():
    makefile = (CLUSTER.parent / "Makefile").read_text()
    assert re.search(r"^MALLOC_TUNABLES = (.+)$", makefile, re.M)[1] == MALLOC_TUNABLES
    assert "GLIBC_TUNABLES=$${GLIBC_TUNABLES-$(MALLOC_TUNABLES)}" in makefile


def test_cluster_launcher_yaml():
    cfg = load_docs(CLUSTER / "cluster.yaml")[0]
    assert cfg["provider"]["type"] in ("aws", "gcp")
    assert ray.__version__ in cfg["docker"]["image"]
    assert any("requirements.lock" in c for c in cfg["setup_commands"])
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert "--head" not in " ".join(cfg["worker_start_ray_commands"])
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    workers = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert workers and all(n["min_workers"] == 0 for n in workers)  # GPU workers autoscale from zero
    assert "/mnt/shared" in " ".join(cfg["initialization_commands"])
    assert len(personalize_commands((CLUSTER / "cluster.yaml").read_text())) == 1


def _pod_envs(pod_spec: dict) -> list[dict[str, dict]]:
    return [{e["name"]: e for e in c.get("env", [])} for c in pod_spec["containers"]]


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    groups = spec["workerGroupSpecs"]
    pods = [head_pod] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        for env in _pod_envs(pod):
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # the token comes from a Secret
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["personalize-shared"]
        assert all(any(m["mountPath"] == "/mnt/shared" for m in c["volumeMounts"]) for c in pod["containers"]), (
            "every pod mounts the shared outputs volume"
        )
    for group in groups:
        assert group["minReplicas"] == 0
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_kuberay_raycluster(tmp_path):
    docs = {d["kind"]: d for d in load_docs(CLUSTER / "kuberay" / "raycluster.yaml")}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    check_ray_cluster_spec(docs["RayCluster"]["spec"])


def test_kuberay_rayjob_entrypoint_is_a_valid_personalize_command(tmp_path):
    (job,) = load_docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["kind"] == "RayJob"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["personalize", "run"]
    check_command(words[1:], tmp_path)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env.pop("working_dir") == "/home/ray/personalization"  # the checkout inside the image
    assert runtime_env["env_vars"]["GLIBC_TUNABLES"] == MALLOC_TUNABLES
    RuntimeEnv(**runtime_env)
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])


def test_local_head_script_stops_only_what_it_started():
    script = CLUSTER / "local_head.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    code = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert "ray stop" not in code and "pkill" not in code and "killall" not in code
    assert "--dashboard-host 127.0.0.1" in code and "--temp-dir" in code
    assert 'RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in code  # closed by default (tests/reliability/test_ports.py)
    assert f'GLIBC_TUNABLES="${{GLIBC_TUNABLES-{MALLOC_TUNABLES}}}"' in code  # the local run's malloc settings
    usage = subprocess.run([str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop|status" in usage.stderr
