"""`use_gpu=auto` against real Ray: CPU on a machine without GPUs (said in the log), and on an autoscaling cluster
whose GPU workers start from zero, a GPU stage's work asks for a GPU and the autoscaler brings a GPU node up.

The autoscaling cluster is Ray's fake one (RAY_FAKE_CLUSTER=1: the autoscaler starts local "nodes" that declare
GPUs without CUDA, so the work placed there runs on CPU). ``ray.cluster_utils.AutoscalingCluster.start()`` is not
used: it runs ``ray stop --force`` first, which kills every Ray on the machine, and its config template is not in
the wheel. The head is started here with its own temp dir and free ports, and stopped by ending exactly the
processes that name that temp dir, by PID.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
from PIL import Image

from personalization import schema
from personalization.artifacts import commit_stage, read_manifest
from personalization.config import build_config
from personalization.models import apply_lora, build_encoder, save_adapter
from pipelines import evaluate
from pipelines.instances import concurrency, worker_resources
from pipelines.resources import cluster_capacity, gpu_node_types, wants_gpu

RAY = str(Path(sys.executable).with_name("ray"))
GPU_WORKER = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}


def test_auto_runs_on_cpu_without_gpus_and_says_so(ray_local, caplog):
    cfg = build_config({"evaluate": {"use_gpu": "auto"}, "dreambooth": {"use_gpu": True}})
    assert ray.cluster_resources().get("GPU", 0) == 0
    assert gpu_node_types() == {}  # the local head's autoscaler runs without a config: no node types
    with caplog.at_level(logging.INFO, logger="personalize.resources"):
        assert wants_gpu(cfg, "evaluate") is False
    assert "evaluate: running on CPU" in caplog.text and "evaluate.use_gpu=true" in caplog.text
    # true asks for a GPU even here (an autoscaler would bring one; this machine never will)
    assert wants_gpu(cfg, "dreambooth") is True
    assert worker_resources(cfg, wants_gpu(cfg, "dreambooth")) == {"GPU": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# A fake autoscaling cluster: a CPU head (--num-gpus=0, as in cluster/cluster.yaml) and GPU workers from zero.


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_fake_cluster(temp_dir: Path) -> str:
    """``ray start --head`` with a fake-multinode autoscaler, private to ``temp_dir``; returns the GCS address."""
    node_ip = ray.util.get_node_ip_address()
    port, client_port, agent_port = free_ports(3)
    config = {
        "cluster_name": "fake-gpu",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"{node_ip}:{port}",  # else its nodes join whatever listens on 6379
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu": GPU_WORKER,
        },
        # The launcher keys the autoscaler reads (nothing to run or copy on fake nodes).
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False, "auth": {}, "docker": {},
    }  # fmt: skip
    (temp_dir / "autoscaling.json").write_text(json.dumps(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    command = [
        RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0",
        f"--autoscaling-config={temp_dir / 'autoscaling.json'}", "--include-dashboard=false",
        f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
        "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
    return f"{node_ip}:{port}"


def stop_processes_naming(temp_dir: Path, since: float) -> list[int]:
    """End the processes started after ``since`` whose command line or open files name ``temp_dir``; their PIDs."""
    ours = []
    for process in psutil.process_iter(["cmdline", "create_time"]):
        if process.pid == os.getpid() or process.info["create_time"] < since:
            continue
        try:
            names = [*(process.info["cmdline"] or []), *(f.path for f in process.open_files())]
        except psutil.Error:
            continue
        if any(str(temp_dir) in name for name in names):
            ours.append(process)
    for process in ours:
        process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=5)
    for process in alive:  # Ray's agents outlive a SIGTERM once their raylet is gone
        process.kill()
    psutil.wait_procs(alive, timeout=10)
    return [p.pid for p in ours]


@pytest.fixture
def fake_gpu_cluster():
    """Connected to a fake autoscaling cluster for the test; the session's local Ray (if any) is back after."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayfake-", dir="/tmp"))  # short: Ray's socket paths live inside
    since, had_local = time.time() - 1, ray.is_initialized()
    ray.shutdown()
    try:
        address = start_fake_cluster(temp_dir)
        ray.init(address=address, log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        stopped = stop_processes_naming(temp_dir, since)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if had_local:  # as conftest's ray_local started it, for the tests after this one
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert stopped, "the fake cluster's processes were not found"
    assert not [p for p in stopped if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def write_evaluate_inputs(out: Path, weights: Path, instances=("mug_a", "mug_b")) -> None:
    """OUT/ingest (2 train + 2 test photos per instance, with masks) and a LoRA adapter per instance."""
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    rows = [
        schema.make_row(
            image_id=f"{instance}-{role}-{k}", instance_id=instance, category="mug", role=role, source="real",
            split="train" if role == "real_train" else "in_distribution", instance_split="test",
            image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), mask=mask,
        )
        for instance in instances
        for role in ("real_train", "real_test")
        for k in range(2)
    ]  # fmt: skip
    (out / "ingest").mkdir(parents=True)
    schema.write_image_table(rows, out / "ingest" / "images.parquet")
    (out / "ingest" / "instances.json").write_text(
        json.dumps({i: {"category": "mug", "split": "test"} for i in instances})
    )
    cfg = build_config({"model": {"backbone": "dinov2_vitb14", "weights": str(weights), "image_size": 28}})
    for seed, instance in enumerate(instances):
        torch.manual_seed(seed)
        encoder = apply_lora(build_encoder(cfg.model), cfg.model)

        def save(tmp: Path, encoder=encoder) -> None:
            save_adapter(encoder, tmp)

        commit_stage(out / "train" / instance, "train", {"seed": seed}, save)


@pytest.mark.slow
def test_auto_brings_up_a_gpu_node_for_the_evaluate_stage(tmp_path, fake_gpu_cluster, caplog, tiny_zoo):
    weights = tiny_zoo(["dinov2"])["dinov2"]
    out = tmp_path / "out"
    write_evaluate_inputs(out, weights)
    cfg = build_config(
        {
            "output_dir": str(out),
            "model": {"backbone": "dinov2_vitb14", "weights": str(weights), "image_size": 28},
            "evaluate": {"tasks": ["classification", "retrieval"], "batch_size": 4, "use_gpu": "auto"},
        }
    )
    assert ray.cluster_resources().get("GPU", 0) == 0  # nothing GPU is up: the head has --num-gpus=0
    assert gpu_node_types() == {"gpu": 1}
    assert cluster_capacity()["GPU"] == 1 and concurrency(cfg, {"GPU": 1.0}, pending=3) == 1

    with caplog.at_level(logging.INFO, logger="personalize.resources"):
        folder = evaluate.run(cfg)

    assert "evaluate: no GPU is up yet; asking for GPUs, which the autoscaler adds (gpu)" in caplog.text
    assert ray.cluster_resources().get("GPU", 0) == 1  # the stage's request brought the GPU node up
    assert read_manifest(folder)["stage"] == "evaluate"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["per_instance"]) == {"mug_a", "mug_b"}
    assert 0.0 <= metrics["personalized"]["classification/pr_auc"] <= 1.0

    # A driver off the head (a job on a worker, a Ray Client) reads the autoscaler's config through a task there.
    def node_and_gpu_types() -> tuple[str, dict]:  # defined here: pickled by value (workers cannot import tests)
        return ray.get_runtime_context().get_node_id(), gpu_node_types()

    head = ray.get_runtime_context().get_node_id()
    node, types = ray.get(ray.remote(num_gpus=1)(node_and_gpu_types).remote(), timeout=120)
    assert node != head and types == {"gpu": 1}
