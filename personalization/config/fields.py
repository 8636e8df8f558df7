"""What the sections share: the GPU choice of a stage and the marker of a path field."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Literal

from personalization.config.layers import require

# Where a stage's GPU work runs (pipelines/resources.py: wants_gpu): "auto" asks for GPUs when the cluster has
# some or its autoscaler can add a node with some, else runs on CPU; true always asks; false never does.
GpuChoice = Literal["auto", True, False]


def path_field(default: str = "", *, output: bool = False) -> Any:
    """A field naming a local file or folder (or a hub id that may be one). The CLI makes a relative value absolute
    from its working directory (Ray workers run elsewhere): an input only when it exists locally, so a hub id stays
    as given; an ``output`` always, before it exists (pipelines/common.py: absolute_paths)."""
    return field(default=default, metadata={"path": "output" if output else "input"})


def check_gpu_choice(value: object, key: str) -> None:
    require(value == "auto" or isinstance(value, bool), key, f"must be auto, true or false, got {value!r}")
