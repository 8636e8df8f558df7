"""Where GPU work runs: one decision, :func:`wants_gpu`, for every stage's ``use_gpu`` (``auto``, true, false).

A stage decides when it starts. On an autoscaling cluster no GPU may be up yet (cluster/cluster.yaml starts the
head with ``--num-gpus=0`` and GPU workers from zero), and GPU workers come only when work asks for GPUs. So
``auto`` asks for GPUs when the cluster has some now *or* its autoscaler has a node type that offers them, and
runs on CPU only when neither holds, saying so in the log; ``true`` always asks (an autoscaler brings a GPU node
up; a cluster that can never have one waits), ``false`` never does. The request does not pick the torch device:
workers take CUDA when ``torch.cuda.is_available()``, so work placed on a node without CUDA still runs, on CPU.

The autoscaler's node types come from the cluster config the GCS holds (platforms that manage the cluster report
it), else from the config file the head's autoscaler was started with (``ray up`` writes
``~/ray_bootstrap_config.yaml``), read on the head node where that process runs. KubeRay's autoscaler runs in a
sidecar container whose config the head cannot see: with KubeRay, set ``use_gpu: true``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import ray
import ray._private.state  # the accessor Ray Data reads the GCS's cluster config with
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from personalization.config import ExperimentConfig, to_dict

log = logging.getLogger("personalize.resources")

UNBOUNDED_NODES = 1_000_000  # a node group without an upper bound (max_count -1 in the GCS cluster config)
HEAD_RESOURCE = "node:__internal_head__"


def wants_gpu(cfg: ExperimentConfig, stage: str) -> bool:
    """Whether ``stage``'s GPU work asks Ray for GPUs, from ``cfg.<stage>.use_gpu`` (see the module docstring)."""
    choice = getattr(cfg, stage).use_gpu
    if choice != "auto":
        return bool(choice)
    if cluster_has_gpu():
        return True
    types = gpu_node_types()
    if types:
        log.info("%s: no GPU is up yet; asking for GPUs, which the autoscaler adds (%s)", stage, ", ".join(types))
        return True
    log.info(
        "%s: running on CPU: the cluster has no GPU and no autoscaler node type with one "
        "(%s.use_gpu=true asks for GPUs anyway)",
        stage, stage,
    )  # fmt: skip
    return False


def cluster_has_gpu() -> bool:
    """Whether the connected cluster has a GPU now (the autoscaler's node types not counted)."""
    return ray.cluster_resources().get("GPU", 0) > 0


def gpu_node_types() -> dict[str, float]:
    """{node type: GPUs per node} over the autoscaler's worker node types that offer GPUs; {} without any."""
    return {name: t["resources"]["GPU"] for name, t in autoscaler_node_types().items() if t["resources"].get("GPU")}


def cluster_capacity() -> dict[str, float]:
    """What the cluster can hold, per resource: what it has now or, where more, what the autoscaler's worker
    nodes add at their maximum counts (the head's own resources are only counted in what it has now)."""
    return compute_capacity(ray.cluster_resources(), autoscaler_node_types())


def compute_capacity(now: dict[str, float], node_types: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per resource, the larger of ``now`` and the sum over ``node_types`` of resources x ``max_workers``."""
    grown: dict[str, float] = {}
    for node_type in node_types.values():
        for key, amount in node_type["resources"].items():
            grown[key] = grown.get(key, 0.0) + amount * node_type["max_workers"]
    return {key: max(now.get(key, 0.0), grown.get(key, 0.0)) for key in {*now, *grown}}


def autoscaler_node_types() -> dict[str, dict[str, Any]]:
    """{name: {"resources": {...}, "max_workers": n}} for the worker node types the autoscaler of the connected
    cluster can start; {} when it has none or none can be read. Looked up once per cluster."""
    return _node_types_of(ray.get_runtime_context().gcs_address)


@functools.cache
def _node_types_of(gcs_address: str) -> dict[str, dict[str, Any]]:
    types = node_types_from_cluster_config(_gcs_cluster_config())
    if not types:
        config = _on_head(read_autoscaling_config, gcs_address)
        types = node_types_from_autoscaling_config(config) if config else {}
    return types


def _gcs_cluster_config() -> Any:
    try:
        return ray._private.state.state.get_cluster_config()
    except Exception as error:  # noqa: BLE001 - a private API: without it, the config file is the source
        log.debug("no cluster config from the GCS: %s", error)
        return None


def node_types_from_cluster_config(config: Any) -> dict[str, dict[str, Any]]:
    """Node types from the GCS's ``autoscaler_pb2.ClusterConfig`` (node groups; ``max_count`` -1 = unbounded)."""
    if config is None:
        return {}
    return {
        group.name: {
            "resources": dict(group.resources),
            "max_workers": group.max_count if group.max_count >= 0 else UNBOUNDED_NODES,
        }
        for group in config.node_group_configs
        if group.max_count != 0
    }


def node_types_from_autoscaling_config(config: dict) -> dict[str, dict[str, Any]]:
    """Worker node types of a cluster-launcher (autoscaler) config: ``available_node_types`` less the head type,
    each type's count capped by the cluster's ``max_workers`` (a type without its own count gets that)."""
    cap = config.get("max_workers")
    types = {}
    for name, spec in (config.get("available_node_types") or {}).items():
        count = spec.get("max_workers", cap or 0)
        count = min(count, cap) if cap is not None else count
        if name != config.get("head_node_type") and count > 0:
            types[name] = {"resources": dict(spec.get("resources") or {}), "max_workers": int(count)}
    return types


def read_autoscaling_config(gcs_address: str) -> dict | None:
    """The config file of the autoscaler (Ray's monitor process) serving ``gcs_address`` on this machine; None
    when no such process runs here or it was started without a config (a plain ``ray start --head``)."""
    port = gcs_address.rsplit(":", 1)[-1]
    for process in psutil.process_iter(["cmdline", "cwd"]):
        args = process.info["cmdline"] or []
        if not any(a.startswith("--gcs-address=") and a.endswith(f":{port}") for a in args):
            continue
        for arg in args:
            if arg.startswith("--autoscaling-config="):
                path = Path(os.path.expanduser(arg.split("=", 1)[1]))
                path = Path(process.info["cwd"] or "/") / path  # a relative path is the monitor's
                try:
                    return yaml.safe_load(path.read_text())
                except (OSError, yaml.YAMLError) as error:
                    log.warning("cannot read the autoscaler's config %s: %s", path, error)
                    return None
    return None


def _on_head(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on the head node: in this process when it runs there, else as a small task pinned to it."""
    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]]
    if not heads:
        return None
    if ray.get_runtime_context().get_node_id() == heads[0] and not ray.util.client.ray.is_connected():
        return fn(*args)
    pinned = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(heads[0], soft=False))(fn)
    return ray.get(pinned.remote(*args), timeout=120)


def without_placement(section: Any) -> dict:
    """A config section as stages hash it: ``use_gpu`` changes where work runs, not what it makes."""
    return {key: value for key, value in to_dict(section).items() if key != "use_gpu"}
