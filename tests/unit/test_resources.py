"""`use_gpu` (auto / true / false) from config to the GPU decision, without starting Ray.

The decision against a running Ray, and `auto` bringing up a GPU node on an autoscaling cluster, are in
tests/integration/test_autoscaling.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from ray.core.generated import autoscaler_pb2

from personalization.artifacts import hash_config
from personalization.config import ConfigError, build_config, load_config
from pipelines.resources import (
    UNBOUNDED_NODES,
    compute_capacity,
    node_types_from_autoscaling_config,
    node_types_from_cluster_config,
    read_autoscaling_config,
    wants_gpu,
    without_placement,
)

ROOT = Path(__file__).resolve().parents[2]
GPU_STAGES = ("dreambooth", "generate", "filter", "train", "evaluate")


def test_use_gpu_defaults_and_what_yaml_and_overrides_spell(tmp_path):
    defaults = build_config()
    assert [getattr(defaults, s).use_gpu for s in GPU_STAGES] == ["auto", "auto", "auto", False, "auto"]
    config = tmp_path / "gpu.yaml"
    config.write_text("dreambooth: {use_gpu: true}\ngenerate: {use_gpu: false}\ntrain: {use_gpu: auto}\n")
    cfg = load_config(config, ["filter.use_gpu=true", "evaluate.use_gpu=false"])
    assert [getattr(cfg, s).use_gpu for s in GPU_STAGES] == [True, False, True, "auto", False]


@pytest.mark.parametrize("value", ["gpu", "1", "0.5", "'true'"])
def test_other_use_gpu_values_fail_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^evaluate\.use_gpu: must be"):
        load_config(None, [f"evaluate.use_gpu={value}"])


def test_true_and_false_decide_from_the_config_alone():
    """No cluster is asked (without a running Ray, asking would raise)."""
    assert wants_gpu(build_config({"generate": {"use_gpu": True}}), "generate") is True
    assert wants_gpu(build_config({"filter": {"use_gpu": False}}), "filter") is False
    assert wants_gpu(build_config(), "train") is False  # train keeps its old default: CPU unless asked


def test_use_gpu_never_changes_a_stage_hash():
    on, off = build_config({"evaluate": {"use_gpu": True}}), build_config({"evaluate": {"use_gpu": False}})
    assert "use_gpu" not in without_placement(on.evaluate)
    assert hash_config(without_placement(on.evaluate)) == hash_config(without_placement(off.evaluate))
    other = build_config({"evaluate": {"batch_size": 8}})
    assert hash_config(without_placement(other.evaluate)) != hash_config(without_placement(off.evaluate))


def test_the_shipped_cluster_declares_its_gpu_workers():
    """cluster/cluster.yaml as the head's autoscaler reads it: `auto` sees a GPU node type before any is up."""
    config = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())
    types = node_types_from_autoscaling_config(config)
    assert config["head_node_type"] not in types
    assert {name: t["resources"].get("GPU", 0) for name, t in types.items()} == {"gpu_worker": 1}
    assert types["gpu_worker"]["max_workers"] == 8
    assert "--num-gpus=0" in " ".join(config["head_start_ray_commands"])  # GPU work never lands on the head


def test_node_types_are_capped_by_the_cluster_max_workers():
    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 4}, "max_workers": 0},
            "big": {"resources": {"CPU": 8, "GPU": 4}, "min_workers": 0, "max_workers": 10},
            "default_count": {"resources": {"CPU": 2}},
            "off": {"resources": {"GPU": 1}, "max_workers": 0},
        },
    }
    assert node_types_from_autoscaling_config(config) == {
        "big": {"resources": {"CPU": 8, "GPU": 4}, "max_workers": 3},
        "default_count": {"resources": {"CPU": 2}, "max_workers": 3},
    }


def test_node_types_from_the_gcs_cluster_config():
    config = autoscaler_pb2.ClusterConfig()
    gpu = config.node_group_configs.add(name="gpu", max_count=-1)
    gpu.resources.update({"CPU": 8, "GPU": 2})
    config.node_group_configs.add(name="drained", max_count=0).resources.update({"GPU": 1})
    cpu = config.node_group_configs.add(name="cpu", max_count=4)
    cpu.resources.update({"CPU": 16})
    assert node_types_from_cluster_config(config) == {
        "gpu": {"resources": {"CPU": 8, "GPU": 2}, "max_workers": UNBOUNDED_NODES},
        "cpu": {"resources": {"CPU": 16}, "max_workers": 4},
    }
    assert node_types_from_cluster_config(None) == {}


def test_capacity_counts_what_the_autoscaler_can_add():
    now = {"CPU": 8.0, "GPU": 0.0}
    types = {"gpu": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 8}}
    assert compute_capacity(now, types) == {"CPU": 32.0, "GPU": 8.0}
    assert compute_capacity({"CPU": 64.0, "GPU": 2.0}, types) == {"CPU": 64.0, "GPU": 8.0}
    assert compute_capacity(now, {}) == now


def test_the_config_is_read_from_the_autoscaler_serving_this_cluster(tmp_path):
    """A stand-in for Ray's monitor process: same flags, a config path relative to its working folder."""
    (tmp_path / "bootstrap.yaml").write_text(
        textwrap.dedent("""\
            max_workers: 2
            head_node_type: head
            available_node_types:
              head: {resources: {CPU: 2}, max_workers: 0}
              gpu: {resources: {CPU: 1, GPU: 1}, max_workers: 2}
        """)
    )
    flags = ["--gcs-address=10.0.0.1:46379", "--autoscaling-config=bootstrap.yaml"]
    monitor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *flags], cwd=tmp_path)
    try:
        config = read_autoscaling_config("10.0.0.1:46379")
        assert config is not None and node_types_from_autoscaling_config(config) == {
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}
        }
        assert read_autoscaling_config("10.0.0.1:46380") is None  # another cluster's address
    finally:
        monitor.kill()
        monitor.wait()
