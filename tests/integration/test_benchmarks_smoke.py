"""Smoke test of `benchmarks/`: every module imports, the shared helpers compute what they claim, and each
benchmark's ``measure`` runs end to end at a minimal size (slow: real Ray, real models). No timing assertions."""

import importlib
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is run from the repo root (`python -m benchmarks`), not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.__main__ import MARKER, ORDER, render, write_results  # noqa: E402

MINIMAL = {
    "cutpaste": {"instances": 1, "composites": 2, "size": 64},
    "evaluate": {"instances": 1, "size": 64, "batch": 4},
    "e2e": {
        "objects": 1,
        "size": 64,
        "triplets": 16,
        "composites": 4,
        "floor_steps": 1,
        "categories": "mug",
        "test_per_category": 1,
    },
    "generate": {"n_images": 3, "n_filtered": 0, "steps": 1, "size": 16, "batch": 1, "repeats": 1},
    "train": {"num_triplets": 16, "batch": 8, "size": 32, "composites": 4, "ddp": False},
    "scale": {"counts": (1,), "size": 64, "triplets": 16, "one_at_a_time": False},
}


@pytest.mark.parametrize("name", ORDER)
def test_every_listed_benchmark_has_a_measure(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.measure)


def test_table_ends_with_the_headline_ratio():
    result = common.Result("x", "a / b", common.ratio(3.0, 2.0), goal=0.9)
    result.add("a", 3.0, "items/s")
    result.add("b", 2.0, "items/s")
    last = result.table().splitlines()[-1]
    assert last.startswith("RATIO a / b") and "1.500" in last
    assert common.ratio(1.0, 0.0) == 0.0


def test_stream_rate_fits_the_steady_state_and_leaves_out_start_up():
    """Stamps of a stream: 5 s of start-up, then 0.01 s per item (100 items/s) with jitter, the first batch's
    stamp a little late (its shard written behind the second's). The fitted rate is the steady 100 items/s,
    whatever the start-up."""
    import random

    rng = random.Random(0)
    stamps = [(1005.0 + 0.04 + 0.035, 4)]
    stamps += [(1005.0 + 0.01 * n + rng.uniform(-0.002, 0.002), n) for n in range(8, 304, 4)]
    assert common.stream_rate(stamps) == pytest.approx(100.0, rel=0.01)
    assert common.stream_rate(list(reversed(stamps))) == pytest.approx(100.0, rel=0.01)  # order does not matter
    later = [(time + 60.0, items) for time, items in stamps]  # a minute more start-up changes nothing
    assert common.stream_rate(later) == pytest.approx(common.stream_rate(stamps), rel=1e-9)
    assert math.isnan(common.stream_rate(stamps[:2]))  # one stamp left after the warm-up: no rate


def test_results_file_keeps_the_hand_written_notes(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# notes by hand\n\n{MARKER}\nold numbers\n")
    result = common.Result("cutpaste", "ray / plain", 1.25)
    write_results(render(common.machine(), [result], {"train": "boom"}, 1.0), path)
    text = path.read_text()
    assert text.startswith("# notes by hand") and "old numbers" not in text
    assert "| cutpaste | ray / plain | 1.250 |" in text and "FAILED: boom" in text


def test_gpu_benchmark_skips_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the gpu benchmark really runs (python -m benchmarks --only gpu)")
    from benchmarks import gpu

    assert math.isnan(gpu.measure().ratio)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_measure_runs_at_a_minimal_size(name, ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "BENCH_DIR", tmp_path)
    result = importlib.import_module(f"benchmarks.{name}").measure(**MINIMAL[name])
    assert result.rows and math.isfinite(result.ratio) and result.ratio > 0
    assert result.table().splitlines()[-1].startswith("RATIO")
