"""The torch device a process computes on: the one asked for, else CUDA when this process sees a GPU, else CPU.

Where Ray places work (and whether it asks for GPUs at all) is decided in ``pipelines/resources.py``; this only
picks the device inside the process the work landed in, so work placed on a node without CUDA still runs, on CPU.
"""

from __future__ import annotations

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` when given (``"cuda:1"``, ``"cpu"``), else ``cuda`` when CUDA is available here, else ``cpu``."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
