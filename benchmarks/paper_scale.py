"""`paper_scale`: a rehearsal of a PODS-sized ``personalize run`` on the tiny zoo models, at 1x and 4x the data,
recording the driver's and every Ray worker's peak RSS and the wall time per stage.

What it runs: a synthetic dataset in the PODS layout (``make_toy``'s objects and scenes: categories, val/test
objects, train photos with masks, test images in the four test splits, dense test images with masks), then
``python -m pipelines.cli run`` (= ``personalize run``) as a subprocess, so the driver is a process of its own:
ingest -> dreambooth -> generate (+ DreamSim filter) -> cutpaste -> train -> evaluate, with the zoo's tiny
Stable Diffusion, DreamSim and DINOv2 (random weights: the images are noise, the bytes and counts are real).
While it runs, a thread samples every ``interval`` s the RSS of the driver (and the part of it that is mapped
shared memory, i.e. Ray's object store) and of every Ray worker process below it (``ray::...`` processes, children
of the raylet the driver started); the run's own ``[i/N] stage ...`` / ``... done in X s`` lines say which stage
each sample belongs to.

"4x the data" = 4x the test objects (and val objects), each with the same photos, test and dense images,
positives and composites; negatives stay per category (the categories do not change). The headline is the
driver's peak RSS at 4x over that at 1x (issue 13's goal: <= 1.2); beside it the per-object cost (run wall /
objects) at 4x over 1x (goal <= 1) and the driver's growth per added object, per stage.

Sizes (per 1x; ``measure(paper=True)``, ``BENCH_PAPER_SCALE=1 python -m benchmarks --only paper_scale`` or
``python -m benchmarks.paper_scale --paper``):

- default (about 7 minutes for 1x + 4x on a 2-core CPU): 2 categories, 2 test + 2 val objects; per object 3 train
  photos and 8 test images at 128 px, 4 dense images at 896 px; 16 positives per object and 16 negatives per
  category at 64 px; 16 composites per object.
- paper: PODS's counts and sizes: 4 categories, 70 test + 32 val objects; per object 5 train photos and 16 test
  images at 896 px, 12 dense images at 896 px (840 in all); 450 positives per object and 1,000 negatives per
  category at 512 px; 100 composites per object at 256 px. Models, steps and triplets stay tiny: memory follows
  the data, not the compute. Hours on this CPU; meant for a bigger machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import Result, load_average, ratio, scratch, zoo_dir

MIB = 2**20
STAGE_START = re.compile(r"^\[(\d+)/(\d+)\] (\w+) \.\.\.$")
STAGE_DONE = re.compile(r"^\[(\d+)/(\d+)\] (\w+) done in ([\d.]+) s$")
START_UP, REPORT = "start-up", "report"  # before the first stage line / after the last one


@dataclass(frozen=True)
class Size:
    """One rehearsal's data (per 1x) and the run's settings that follow it."""

    categories: tuple[str, ...] = ("mug", "bottle")
    objects: int = 2  # test objects (the ones personalized and evaluated)
    val_per_category: int = 1
    train_photos: int = 3  # per object, with masks
    test_per_split: int = 2  # per object and test split (4 splits)
    image_size: int = 128  # train and test photos
    dense_per_object: int = 2  # test objects only
    dense_size: int = 896
    generation: bool = True  # dreambooth + generate + filter
    positives: int = 8  # per object
    negatives_per_category: int = 16
    generated_size: int = 64
    composites: int = 16  # per object
    composite_size: int = 128
    backgrounds: int = 8  # generated Cut-and-Paste backgrounds (with generation), once per run
    triplets: int = 32

    def scaled(self, factor: int) -> Size:
        return dataclasses.replace(self, objects=self.objects * factor, val_per_category=self.val_per_category * factor)


PAPER = Size(
    categories=("mug", "bottle", "tote", "screwdriver"),
    objects=70,
    val_per_category=8,
    train_photos=5,
    test_per_split=4,
    image_size=896,
    dense_per_object=12,
    positives=450,
    negatives_per_category=1000,
    generated_size=512,
    composites=100,
    composite_size=256,
    backgrounds=100,
)


def make_dataset(root: Path, size: Size) -> Path:
    """The toy benchmark at ``size`` in the PODS layout: exactly ``size.objects`` test objects, dense images for
    them only (photos and dense images drawn at their own sizes, by two ``make_toy`` calls with the same seed)."""
    from personalization.datasets import make_toy

    shared = {
        "seed": 0,
        "categories": list(size.categories),
        "val_per_category": size.val_per_category,
        "test_per_category": math.ceil(size.objects / len(size.categories)),
    }
    same = size.dense_size == size.image_size
    make_toy(root, train_per_instance=size.train_photos, test_per_split=size.test_per_split,
             dense_per_instance=size.dense_per_object if same else 0, size=size.image_size, **shared)  # fmt: skip
    if not same:
        dense = make_toy(root.with_name(f"{root.name}-dense"), train_per_instance=1, test_per_split=0,
                         dense_per_instance=size.dense_per_object, size=size.dense_size, **shared)  # fmt: skip
        for sub in ("test_dense", "test_dense_masks"):
            shutil.move(dense / sub, root / sub)
        shutil.rmtree(dense)
    _keep_objects(root, size.objects)
    return root


def _keep_objects(root: Path, objects: int) -> None:
    """Drop the surplus test objects (the last drawn, across categories) and the val objects' dense images."""
    info = json.loads((root / "pods_info.json").read_text())
    split = info["class_to_split"]
    tests = sorted((c for c in info["classes"] if split[c] == "test"), key=lambda c: (c.rsplit("_", 1)[1], c))
    dropped = set(tests[objects:])
    for sub in ("train", "train_masks", "test", "test_masks", "test_dense", "test_dense_masks"):
        for instance in info["classes"]:
            if instance in dropped or (sub.startswith("test_dense") and split[instance] == "val"):
                shutil.rmtree(root / sub / instance, ignore_errors=True)
    classes = [c for c in info["classes"] if c not in dropped]
    info = {
        "classes": classes,
        "class_to_idx": {c: i for i, c in enumerate(classes)},
        "class_to_sc": {c: info["class_to_sc"][c] for c in classes},
        "class_to_split": {c: split[c] for c in classes},
    }
    annos = json.loads((root / "pods_image_annos.json").read_text())
    annos = {key: value for key, value in annos.items() if value["class"] not in dropped}
    (root / "pods_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    (root / "pods_image_annos.json").write_text(json.dumps(annos, indent=2, sort_keys=True))


def run_config(size: Size, zoo: dict[str, Path]) -> dict:
    """The config layer of the rehearsal's ``personalize run`` (tiny models, counts from ``size``)."""
    layer = {
        "name": "paper_scale",
        "model": {"backbone": "dinov2_vitb14", "weights": str(zoo["dinov2"]), "image_size": 28},
        "cutpaste": {"images_per_instance": size.composites, "image_size": size.composite_size},
        "train": {
            "positive_sources": ["cutpaste"],
            "negatives": "val",
            "num_triplets": size.triplets,
            "batch_size": 8,
            "epochs": 1,
        },  # fmt: skip
        "evaluate": {"dense_image_size": 56, "min_object_pixels": 20, "batch_size": 16, "num_actors": 2},
        "ray": {"dashboard": False},
    }
    if size.generation:
        layer["dreambooth"] = {"enabled": True, "base_model": str(zoo["stable_diffusion"]), "steps": 2,
                               "resolution": 32, "class_images": 2, "mixed_precision": "no",
                               "use_8bit_adam": False, "checkpoint_every": 0}  # fmt: skip
        layer["generate"] = {"enabled": True, "positives_per_instance": size.positives,
                             "negatives_per_category": size.negatives_per_category,
                             "max_attempts": 4 * max(size.positives, size.negatives_per_category), "num_prompts": 8,
                             "steps": 1, "image_size": size.generated_size, "batch_size": 8}  # fmt: skip
        layer["cutpaste"]["num_backgrounds"] = size.backgrounds
        layer["filter"] = {"cache_dir": str(zoo["dreamsim"]), "dreamsim_type": "clip_vitb32", "threshold": 0.0}
        layer["train"] |= {"positive_sources": ["masked_dreambooth", "cutpaste"], "negatives": "generated"}
    return layer


@dataclass
class StageStats:
    """What the sampler saw during one stage (memory in MiB)."""

    wall: float = 0.0
    driver_start: float = 0.0  # the driver's RSS at the stage's first sample
    driver_peak: float = 0.0
    driver_shared: float = 0.0  # the driver's mapped shared memory (object store pages) at its peak
    worker_peaks: dict[str, float] = field(default_factory=dict)  # "ray::Name [pid]" -> peak RSS
    samples: int = 0

    @property
    def worker_peak(self) -> tuple[str, float]:
        return max(self.worker_peaks.items(), key=lambda item: item[1], default=("", 0.0))


def _memory(process) -> tuple[float, float]:
    """(RSS, shared-memory part of it) of one process in MiB; RssShmem from /proc where Linux has it."""
    rss = process.memory_info().rss / MIB
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return rss, 0.0
    found = re.search(r"^RssShmem:\s+(\d+) kB", status, re.MULTILINE)
    return rss, int(found.group(1)) / 1024 if found else 0.0


def _worker_name(process) -> str | None:
    """``ray::...`` for a Ray worker process (its title), None for anything else (raylet, GCS, agents)."""
    cmdline = process.cmdline()
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    return "ray::starting" if any("default_worker.py" in part for part in cmdline) else None


class TreeSampler(threading.Thread):
    """Samples the RSS of the driver ``pid`` and of every Ray worker below it, every ``interval`` s, into
    ``stats[stage]``; the caller calls :meth:`move_to` as the run reports its stages."""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        super().__init__(daemon=True)
        self.driver, self.interval = psutil.Process(pid), interval
        self.stage = START_UP
        self.stats: dict[str, StageStats] = {START_UP: StageStats()}
        self.names: dict[int, str] = {}  # worker pid -> last name other than IDLE
        self._halt = threading.Event()
        self._lock = threading.Lock()  # the reader thread samples too, at each stage change

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def move_to(self, stage: str) -> None:
        """Sample as the last stage ends and as ``stage`` begins: a stage shorter than ``interval`` has samples too."""
        self.sample()
        self.stage = stage
        self.sample()

    def sample(self) -> None:
        with self._lock:
            self._sample(self.stats.setdefault(self.stage, StageStats()))

    def _sample(self, stats: StageStats) -> None:
        import psutil

        try:
            rss, shared = _memory(self.driver)
            children = self.driver.children(recursive=True)
        except psutil.Error:  # the driver has exited
            return
        if not stats.samples:
            stats.driver_start = rss
        stats.samples += 1
        if rss > stats.driver_peak:
            stats.driver_peak, stats.driver_shared = rss, shared
        for child in children:
            try:
                name = _worker_name(child)
                if name is None:
                    continue
                if name != "ray::IDLE" or child.pid not in self.names:
                    self.names[child.pid] = name
                label = f"{self.names[child.pid]} [{child.pid}]"
                stats.worker_peaks[label] = max(stats.worker_peaks.get(label, 0.0), _memory(child)[0])
            except psutil.Error:  # a worker that ended between the listing and the read
                continue


@dataclass
class Rehearsal:
    """One ``personalize run``: its objects, total wall, per-stage stats (in run order) and output folder."""

    objects: int
    wall: float
    stages: dict[str, StageStats]
    out: Path

    @property
    def driver_peak(self) -> float:
        return max(s.driver_peak for s in self.stages.values())

    @property
    def worker_peak(self) -> tuple[str, float]:
        return max((s.worker_peak for s in self.stages.values()), key=lambda item: item[1])


def follow(command: list[str], log_path: Path, interval: float = 0.5) -> tuple[dict[str, StageStats], float]:
    """Run ``command`` (a ``personalize run``), sampling its process tree; returns (stats per stage, wall s).
    Its output goes to ``log_path``; a non-zero exit raises with the command and the log's last lines."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        sampler = TreeSampler(process.pid, interval)
        sampler.start()
        began: dict[str, float] = {}
        for line in process.stdout:
            log.write(line)
            if found := STAGE_START.match(line.strip()):
                began[found[3]] = time.perf_counter()
                sampler.move_to(found[3])
            elif found := STAGE_DONE.match(line.strip()):
                sampler.stats.setdefault(found[3], StageStats()).wall = float(found[4])
                if found[1] == found[2]:  # the last stage: what follows is the summary and the report
                    sampler.move_to(REPORT)
        code = process.wait()
        sampler.stop()
    wall = time.perf_counter() - started
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"`{' '.join(command)}` exited {code}; its log is {log_path}; last lines:\n{tail}")
    stats = sampler.stats
    stats[START_UP].wall = (min(began.values()) if began else time.perf_counter()) - started
    if REPORT in stats:
        stats[REPORT].wall = wall - stats[START_UP].wall - sum(s.wall for k, s in stats.items() if k != START_UP)
    return {k: stats[k] for k in (START_UP, *began, REPORT) if k in stats}, wall


def rehearse(size: Size, folder: Path, interval: float = 0.5) -> Rehearsal:
    """Write the dataset for ``size`` under ``folder`` and run ``personalize run`` on it from an empty output."""
    import yaml

    from personalization.zoo import build_zoo

    zoo = build_zoo(zoo_dir(), parts=["dinov2", "stable_diffusion", "dreamsim"] if size.generation else ["dinov2"])
    root = make_dataset(folder / "data", size)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(size, zoo), sort_keys=False))
    out = folder / "run"
    command = [sys.executable, "-m", "pipelines.cli", "run", "--config", str(config), f"data.root={root}",
               f"output_dir={out}"]  # fmt: skip
    stages, wall = follow(command, folder / "run.log", interval)
    return Rehearsal(size.objects, wall, stages, out)


def measure(factors: tuple[int, ...] = (1, 4), paper: bool | None = None, interval: float = 0.5, **changes) -> Result:
    """Rehearse at each of ``factors`` x the base size (PODS's when ``paper``, default from BENCH_PAPER_SCALE);
    ``changes`` override fields of the base :class:`Size`."""
    if paper is None:
        paper = os.environ.get("BENCH_PAPER_SCALE", "") not in ("", "0")
    base = dataclasses.replace(PAPER if paper else Size(), **changes)
    folder = scratch("paper_scale")
    runs = {f: rehearse(base.scaled(f), folder / f"{f}x", interval) for f in factors}
    return report(runs, base, paper)


def report(runs: dict[int, Rehearsal], base: Size, paper: bool) -> Result:
    """The table: totals per factor, growth per added object, per-stage lines; headline driver peak last/first."""
    first, last = min(runs), max(runs)
    result = Result("paper_scale", f"driver peak RSS at {last}x / at {first}x the data (goal <= 1.2)", 0.0)
    for f, run in runs.items():
        name, worker = run.worker_peak
        result.add(f"{f}x: objects", run.objects, "")
        result.add(f"{f}x: personalize run wall", run.wall, "s")
        result.add(f"{f}x: wall per object", run.wall / run.objects, "s")
        result.add(f"{f}x: driver peak RSS", run.driver_peak, "MiB")
        result.add(f"{f}x: max worker peak RSS ({name.split(' ')[0]})", worker, "MiB")
    if last != first:
        added = runs[last].objects - runs[first].objects
        cost = ratio(runs[last].wall / runs[last].objects, runs[first].wall / runs[first].objects)
        result.add(f"per-object cost {last}x / {first}x (goal <= 1)", cost, "")
        result.add("driver peak growth per added object", (runs[last].driver_peak - runs[first].driver_peak) / added,
                   "MiB")  # fmt: skip
    result.notes += stage_lines(runs)
    result.notes.append(
        f"{'PODS counts (--paper)' if paper else 'default base'} per 1x: {base.objects} test objects in "
        f"{len(base.categories)} categories (+{base.val_per_category} val each), {base.train_photos} photos + "
        f"{4 * base.test_per_split} test images at {base.image_size} px and {base.dense_per_object} dense at "
        f"{base.dense_size} px per object; generation {'on' if base.generation else 'off'} ({base.positives} "
        f"positives/object, {base.negatives_per_category} negatives/category at {base.generated_size} px); "
        f"{base.composites} composites/object; tiny zoo models; load average after: {load_average()}"
    )
    result.ratio = runs[last].driver_peak / runs[first].driver_peak
    return result


def stage_lines(runs: dict[int, Rehearsal]) -> list[str]:
    """One line per stage and factor: wall, the driver's peak RSS, its rise within the stage (peak - RSS at the
    stage's start), the shared-memory (object store) part at the peak, and the largest worker peak RSS (MiB)."""
    order = list(dict.fromkeys(k for run in runs.values() for k in run.stages))
    head = "".join(f"{f'{f}x: wall s':>12}{'driver':>8}{'rise':>6}{'shm':>5}{'worker':>8}" for f in runs)
    lines = [f"{'stage':<11}{head}"]
    for stage in order:
        cells = [run.stages.get(stage, StageStats()) for run in runs.values()]
        lines.append(f"{stage:<11}" + "".join(
            f"{s.wall:>12.1f}{s.driver_peak:>8.0f}{s.driver_peak - s.driver_start:>6.0f}{s.driver_shared:>5.0f}"
            f"{s.worker_peak[1]:>8.0f}" for s in cells))  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.paper_scale [--paper] [--factors 1,4]``: print the table (RESULTS.md untouched)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="PODS's counts and sizes as the 1x base")
    parser.add_argument("--factors", default="1,4", help="comma-separated multiples of the base (default 1,4)")
    args = parser.parse_args(argv)
    print(measure(tuple(int(f) for f in args.factors.split(",")), paper=args.paper).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
