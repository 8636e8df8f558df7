"""Smoke test of `benchmarks/paper_scale.py`: the PODS-shaped dataset it writes, its process-tree sampler on a
scripted driver with a fake Ray worker, and one real ``personalize run`` at a minimal size (slow). No timing
assertions."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is run from the repo root (`python -m benchmarks`), not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import common, paper_scale  # noqa: E402

# A driver that reports two stages as `personalize run` does and, during the first, starts a child titled like a
# Ray worker that holds 64 MiB of written memory.
FAKE_DRIVER = """
import subprocess, sys, time
print("[1/2] ingest ...", flush=True)
code = "import time; held = b'x' * (64 * 2**20); time.sleep(1.5)"
subprocess.run(["ray::FakeWorker", "-c", code], executable=sys.executable, check=True)
print("[1/2] ingest done in 1.5 s", flush=True)
print("[2/2] train ...", flush=True)
time.sleep(0.5)
print("[2/2] train done in 0.5 s", flush=True)
"""


def test_dataset_has_the_pods_shape_at_the_asked_counts(tmp_path):
    from personalization.datasets import read_dataset

    size = paper_scale.Size(objects=3, val_per_category=1, train_photos=2, test_per_split=1, image_size=64,
                            dense_per_object=2, dense_size=96)  # fmt: skip
    rows, instances = read_dataset(paper_scale.make_dataset(tmp_path / "data", size))
    splits = Counter(info["split"] for info in instances.values())
    assert splits == {"test": 3, "val": 2}  # 2 categories x 2 test drawn, the surplus one dropped
    assert {info["category"] for info in instances.values()} == {"mug", "bottle"}
    dense = [r for r in rows if r["split"] == "test_dense"]
    assert Counter(r["instance_id"] for r in dense) == {i: 2 for i, v in instances.items() if v["split"] == "test"}
    assert all(r["mask"] is not None and (r["width"], r["height"]) == (96, 96) for r in dense)
    train = [r for r in rows if r["role"] == "real_train"]
    assert len(train) == 5 * 2 and all(r["mask"] is not None and r["width"] == 64 for r in train)
    assert len([r for r in rows if r["role"] == "real_test" and r["split"] != "test_dense"]) == 5 * 4
    assert not (tmp_path / "data-dense").exists()
    assert paper_scale.Size().scaled(4).objects == 8 and paper_scale.PAPER.objects == 70
    assert paper_scale.PAPER.objects * paper_scale.PAPER.dense_per_object == 840


def test_sampler_splits_memory_by_stage_and_sees_the_worker(tmp_path):
    stages, wall = paper_scale.follow([sys.executable, "-c", FAKE_DRIVER], tmp_path / "log.txt", interval=0.1)
    assert list(stages) == ["start-up", "ingest", "train", "report"]
    assert stages["ingest"].wall == 1.5 and stages["train"].wall == 0.5 and wall >= 2.0
    workers = stages["ingest"].worker_peaks
    assert [label.split(" ")[0] for label in workers] == ["ray::FakeWorker"]
    assert list(workers.values())[0] > 64  # MiB: the bytes it wrote, plus the interpreter
    assert all(s.driver_peak > 0 for k, s in stages.items() if s.samples)
    assert stages["train"].samples > 0 and not stages["train"].worker_peaks  # the worker had ended
    assert "[2/2] train done in 0.5 s" in (tmp_path / "log.txt").read_text()


def test_a_failed_run_names_its_command_and_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited 3; its log is .*log.txt; last lines:\n.*boom"):
        paper_scale.follow([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "log.txt")


@pytest.mark.slow
def test_rehearsal_at_a_minimal_size(tmp_path, monkeypatch):
    """One real `personalize run` (its own driver process and Ray), generation off, one object."""
    monkeypatch.setattr(common, "BENCH_DIR", tmp_path)
    size = paper_scale.Size(categories=("mug",), objects=1, generation=False, train_photos=2, test_per_split=1,
                            image_size=64, dense_per_object=1, dense_size=256, composites=4, triplets=8)  # fmt: skip
    run = paper_scale.rehearse(size, tmp_path / "1x", interval=0.25)
    assert list(run.stages) == ["start-up", "ingest", "cutpaste", "train", "evaluate", "report"]
    assert all(s.samples > 0 and s.driver_peak > 0 for s in run.stages.values())
    assert run.stages["train"].worker_peak[1] > 0 and run.stages["evaluate"].worker_peak[1] > 0
    assert json.loads((run.out / "summary.json").read_text())["instances"] == ["mug_01"]
    with Image.open(next((tmp_path / "1x" / "data" / "test_dense" / "mug_01").iterdir())) as image:
        assert image.size == (256, 256)
    result = paper_scale.report({1: run}, size, paper=False)
    assert result.ratio == 1.0 and result.table().splitlines()[-1].startswith("RATIO driver peak RSS")
