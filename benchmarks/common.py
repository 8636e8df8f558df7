"""What every benchmark shares: the result table, timing, the local Ray, scratch folders and the machine line.

A benchmark is a module with ``measure(**sizes) -> Result`` (``python -m benchmarks --only NAME`` prints its
table; the smoke test calls it at a minimal size). Every ratio is ``candidate throughput / baseline
throughput``, both measured in the same process, back to back, on the same model, batch and torch thread count,
so machine load mostly cancels out.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH_DIR = Path(os.environ.get("PERSONALIZE_BENCH_DIR", "outputs/bench"))


@dataclass
class Result:
    """One benchmark's table: ``rows`` of (label, value, unit); the headline ratio is printed last."""

    name: str
    headline: str  # e.g. "ray / plain images/s (filter off)"
    ratio: float
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    goal: float | None = None  # the ratio the issue asks for, if any

    def add(self, label: str, value: float, unit: str = "") -> None:
        self.rows.append((label, float(value), unit))

    def table(self) -> str:
        width = max([len(label) for label, _, _ in self.rows] + [len(self.headline), 20]) + 2
        lines = [f"== {self.name} =="]
        lines += [f"{label:<{width}}{value:>12.3f}  {unit}" for label, value, unit in self.rows]
        lines += [f"  note: {note}" for note in self.notes]
        goal = f"  (goal >= {self.goal:.2f})" if self.goal is not None else ""
        lines.append(f"{'RATIO ' + self.headline:<{width}}{self.ratio:>12.3f}{goal}")
        return "\n".join(lines)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), wall seconds)``."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def ratio(candidate: float, baseline: float) -> float:
    """Throughput ratio candidate / baseline (0 when the baseline made nothing)."""
    return candidate / baseline if baseline > 0 else 0.0


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[None]:
    """A local Ray started before any timing (reused when one is already up); shut down only if started here."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def quiet_ray_data() -> None:
    """No progress bars or per-operator INFO lines: the benchmark tables are the output."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def stream_rate(stamps: Sequence[tuple[float, int]], skip: int = 1) -> float:
    """Steady-state items/s of one stream, from ``(completion time, items done so far)`` stamps taken as it runs:
    1 / the least-squares slope of time against items, over the stamps after the first ``skip`` (warm-up).

    Start-up (worker start, imports, model load) comes before the first stamp, so it drops out without
    differencing two separately timed runs; NaN when fewer than two stamps remain.
    """
    import numpy as np

    kept = sorted(stamps, key=lambda stamp: stamp[1])[skip:]
    if len(kept) < 2 or kept[-1][1] <= kept[0][1]:
        return float("nan")
    times, items = (np.asarray(column, float) for column in zip(*kept, strict=True))
    slope = np.polyfit(items, times, 1)[0]  # seconds per item
    return 1.0 / slope if slope > 0 else float("nan")


def scratch(name: str, root: Path | None = None) -> Path:
    """An empty folder ``<root or BENCH_DIR>/<name>`` (cleared first)."""
    folder = (root or BENCH_DIR) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder.absolute()


def zoo_dir(root: Path | None = None) -> Path:
    """The cached tiny-model zoo for benchmarks (built once, reused across runs)."""
    return ((root or BENCH_DIR) / "zoo").absolute()


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict[str, str]:
    """The facts a result needs beside it: host CPU, cores, load, torch threads, versions, GPU, date."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "load (1/5/15 min)": load_average(),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def make_toy_ingest(out: Path, *, categories=("mug",), instances_per_category: int = 1, size: int = 64, seed=0):
    """Write the toy benchmark (1 val instance per category + ``instances_per_category`` test ones) and run the
    real ``ingest`` stage on it; returns ``(data_root, output_dir)``."""
    from personalization.config import build_config
    from personalization.datasets import make_toy
    from pipelines import ingest

    root = make_toy(
        out / "toy",
        seed=seed,
        categories=list(categories),
        val_per_category=1,
        test_per_category=instances_per_category,
        test_per_split=1,
        dense_per_instance=1,
        size=size,
    )
    ingest.run(build_config({"output_dir": str(out / "run"), "data": {"root": str(root)}}))
    return root, out / "run"


def toy_workspace(name: str, *, instances: int = 1, composites: int = 16, size: int = 64) -> tuple[Path, dict]:
    """A scratch run folder with the real ``ingest`` and ``cutpaste`` stages done on the toy benchmark (one
    category, one val instance + ``instances`` test ones); returns (folder, the config layer that made it)."""
    from personalization.config import build_config
    from pipelines import cutpaste

    out = scratch(name)
    root, run_dir = make_toy_ingest(out, instances_per_category=instances, size=size)
    layer = {
        "output_dir": str(run_dir),
        "data": {"root": str(root)},
        "cutpaste": {"images_per_instance": composites, "image_size": size},
    }
    with local_ray():
        cutpaste.run(build_config(layer))
    return run_dir, layer
