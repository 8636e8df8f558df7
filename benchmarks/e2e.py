"""End to end: ``personalize run --config configs/demo.yaml`` on N toy objects against a *compute floor*.

Candidate: the demo run (the real ImageNet MobileNetV2, Cut-and-Paste positives, val-instance negatives) as a
subprocess on ``objects`` toy test objects (one category, two val instances), its stdout timed line by line: the
per-stage ``[i/N] stage done in X s`` lines, the start before the first stage (imports + Ray start) and the tail
after the last (summary, report, Ray shutdown), the time each train instance spends in its loop
(``metrics.json``: steps x batch / samples_per_s) and the first evaluation unit's arrival.

Floor, measured after the run in this process with torch on every core, on the run's own outputs:
- train: the same LoRA model, image size, batch (3 x batch images), loss and optimizer; forward + backward + step
  on ready tensors, ``floor_steps`` timed after one warm-up, times the run's steps per object, times objects;
- evaluate: the same encoders (pretrained, and each object's adapter) embedding the run's train + test images at
  the model's size and computing the dense maps of its dense images and masked train images at
  ``evaluate.dense_image_size``: per-image cost from one batch each, times the images each encoder sees;
- cutpaste: ``make_composites`` over the same rows and backgrounds in one process, divided by the cores (PIL work
  is single-threaded, the composites independent);
- ingest: its own time (reading and hashing a few dozen photos; no floor is measured).
The headline is floor / actual for the whole run (goal 0.6, issue 16). Rows after the per-stage ones attribute
the rest where they can: start-up, train outside its loops, image decode + transform (plain, per run), dense
post-processing (masks, boxes; plain), evaluate before its first unit.

A plain process runs glibc's default malloc, which spends ~40% of a CPU train step in the kernel; the run's Ray
processes get ``MALLOC_TUNABLES`` (pipelines/local_ray.py). So the train and evaluate floors are measured a second
time, on one thread, in a fresh process with those settings (:func:`one_thread_floor`), and the whole run's
floor / actual is also given against that stricter floor.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Result, scratch, timed
from pipelines.local_ray import MALLOC_TUNABLES

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
STAGE_DONE = re.compile(r"^\[(\d+)/(\d+)\] (\w+) done in ([\d.]+) s")
STAGE_START = re.compile(r"^\[(\d+)/(\d+)\] (\w+) \.\.\.$")
UNIT_DONE = re.compile(r"personalize\.evaluate INFO evaluate: (pretrained|personalized) ")


def make_dataset(out: Path, size: int, categories: str = "", test_per_category: int = 0) -> Path:
    """The toy `make demo` runs on, written by the Makefile's ``personalize make-toy --out DIR`` (its defaults: 4
    categories x (2 val + 3 test) instances); ``categories`` (comma-separated) / ``test_per_category`` shrink it."""
    from pipelines import make_toy

    args = ["--out", str(out / "toy"), "--size", str(size)]
    args += ["--categories", categories] if categories else []
    args += ["--test-per-category", str(test_per_category)] if test_per_category else []
    make_toy.main(args)
    return out / "toy"


def run_demo(overrides: list[str], log_path: Path, timeout: float = 3600) -> tuple[float, list[tuple[float, str]]]:
    """Run ``personalize run`` as a subprocess; (wall seconds, [(seconds since start, stdout line)])."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the benchmarks' own Ray
    command = [sys.executable, "-m", "pipelines.cli", "run", "--config", str(CONFIG), *overrides]
    lines: list[tuple[float, str]] = []
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process, log_path.open("w") as log:  # fmt: skip
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
            log.write(line)
            if time.perf_counter() - started > timeout:
                process.kill()
        code = process.wait()
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"personalize run exited {code}; its output is in {log_path}")
    return wall, lines


def parse_stages(lines: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
    """{stage: {"start": s, "end": s, "seconds": its own figure}} from the run's ``[i/N]`` lines."""
    stages: dict[str, dict[str, float]] = {}
    for at, line in lines:
        if match := STAGE_START.match(line):
            stages[match[3]] = {"start": at}
        elif match := STAGE_DONE.match(line):
            stages[match[3]].update(end=at, seconds=float(match[4]))
    return stages


def train_loops(out: Path, cfg) -> dict[str, float]:
    """{instance: seconds in its training loop}, from the committed ``metrics.json`` files."""
    loops = {}
    for path in sorted((out / "train").glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        loops[path.parent.name] = metrics["steps"] * cfg.train.batch_size / metrics["samples_per_s"]
    return loops


def per_item(fn, items: int, repeats: int = 1) -> float:
    """Seconds per item of ``fn()`` (which handles ``items``), best of ``repeats`` after one warm-up call."""
    fn()
    return min(timed(fn)[1] for _ in range(repeats)) / items


def train_floor(cfg, steps: int) -> tuple[float, float]:
    """(seconds per training step on ready tensors, seconds to augment one step's images) in this process."""
    import torch
    from PIL import Image

    from personalization.contrastive.losses import build_loss
    from personalization.contrastive.step import TorchStepper, train_step
    from pipelines.train import build_lora_encoder

    torch.manual_seed(cfg.seed)
    trainable = build_lora_encoder(cfg)
    model, t, size = trainable.model, cfg.train, cfg.model.image_size
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = TorchStepper(torch.optim.Adam(params, lr=t.learning_rate, betas=(t.beta1, t.beta2)))
    loss_fn = build_loss(t)
    batch = [torch.randn(t.batch_size, 3, size, size) for _ in range(3)]
    model.train()
    step = per_item(lambda: [train_step(model, batch, loss_fn, stepper) for _ in range(steps)], steps)
    image = Image.new("RGB", (2 * size, 2 * size), (120, 90, 60))
    augment = per_item(lambda: [trainable.transform(image) for _ in range(3 * t.batch_size)], 1, repeats=2)
    return step, augment


def evaluate_floor(cfg, out: Path, objects: list[str]) -> dict[str, float]:
    """Seconds the run's evaluation forward passes need in this process over the encoders the run scores
    (pretrained + one per object; a personalized encoder's cost is measured on the first object's adapter), and
    the plain cost of decoding images and post-processing dense maps."""
    import numpy as np
    import torch

    from personalization import schema
    from personalization.config import to_dict
    from personalization.evaluation.dense import compute_similarity_map, segment_similarity
    from personalization.evaluation.extract import FeatureExtractor
    from personalization.evaluation.images import iter_rows, load_evaluation_images, load_instances_file

    images_path = out / "ingest" / "images.parquet"
    sets = load_evaluation_images(images_path, load_instances_file(out / "ingest"))
    embeds = len(sets.train) + len(sets.test)
    templates = {i: len(sets.masked_train(i)) for i in objects}
    dense = {"pretrained": len(sets.dense) + sum(templates.values())}
    dense |= {i: len(sets.dense) + templates[i] for i in objects}
    batch = min(8, cfg.evaluate.batch_size)
    blobs = next(iter_rows(images_path, set(sets.test), ["image"], batch))["image"].to_pylist()
    found = {"forward": 0.0, "decode": 0.0, "post": 0.0}
    costs = {}
    for name in ("pretrained", objects[0]):
        adapter = "" if name == "pretrained" else str(out / "train" / name)
        extractor = FeatureExtractor(to_dict(cfg.model), adapter, dense_size=cfg.evaluate.dense_image_size)
        small = torch.stack([extractor.transform(schema.decode_image(b)) for b in blobs])
        large = extractor._dense_pixels(blobs)
        kind = extractor.model_cfg.eval_feature
        with torch.no_grad():
            embed_s = per_item(lambda e=extractor.encoder, x=small, k=kind: e.embed(x, kind=k), len(blobs))
            dense_s = per_item(lambda e=extractor.encoder, x=large: e.dense(x), len(blobs))
        costs[name] = (embed_s, dense_s)
    for name, count in dense.items():
        embed_s, dense_s = costs["pretrained" if name == "pretrained" else objects[0]]
        found["forward"] += embed_s * embeds + dense_s * count
    decode_s = per_item(lambda: [extractor.transform(schema.decode_image(b)) for b in blobs], len(blobs))
    decode_dense_s = per_item(lambda: extractor._dense_pixels(blobs), len(blobs))
    found["decode"] = (decode_s * embeds + decode_dense_s * len(sets.dense)) * len(dense)
    grid = extractor.dense(blobs[:1])[0]
    reference = grid.reshape(-1, grid.shape[-1]).mean(axis=0)
    hw = sets.size[sets.dense[0]] if sets.dense else (cfg.model.image_size, cfg.model.image_size)
    post_s = per_item(lambda: segment_similarity(compute_similarity_map(grid, np.asarray(reference), hw)), 1, 3)
    found["post"] = post_s * len(sets.dense) * 2 * len(objects)  # each object: pretrained and its own encoder
    return found


def one_thread_floor(config: str, overrides: list[str], out: str, objects: list[str], steps: int) -> dict:
    """{"train_step": s, "evaluate": s}: :func:`train_floor`'s step and :func:`evaluate_floor`'s forward passes on
    one torch thread in this process (run by :func:`tuned_floor` in a process started with other settings)."""
    from personalization.config import load_config

    cfg = load_config(config, overrides)
    step, _ = with_threads(1, lambda: train_floor(cfg, steps))
    return {"train_step": step, "evaluate": with_threads(1, lambda: evaluate_floor(cfg, Path(out), objects))["forward"]}


def tuned_floor(overrides: list[str], out: Path, objects: list[str], steps: int) -> dict:
    """:func:`one_thread_floor` in a fresh process started with the run's malloc settings (glibc reads them at
    process start, so this process cannot switch to them)."""
    args = json.dumps([str(CONFIG), overrides, str(out), objects, steps])
    code = (
        "import json, sys; from benchmarks.e2e import one_thread_floor; "
        "print(json.dumps(one_thread_floor(*json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES}
    done = subprocess.run([sys.executable, "-c", code, args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the floor with the run's malloc settings failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _describe_toy(root: Path) -> str:
    info = json.loads((root / "pods_info.json").read_text())
    splits = list(info["class_to_split"].values())
    images = {folder: sum(1 for _ in (root / folder).glob("*/*")) for folder in ("train", "test", "test_dense")}
    return (f"{splits.count('test')} test + {splits.count('val')} val objects, {images['train']} train, "
            f"{images['test']} test, {images['test_dense']} dense photos")  # fmt: skip


def with_threads(threads: int, fn):
    """``fn()`` with torch on ``threads`` intra-op threads (put back after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def measure(
    objects: int = 2,
    size: int = 0,
    triplets: int = 0,
    composites: int = 0,
    floor_steps: int = 2,
    categories: str = "",
    test_per_category: int = 0,
) -> Result:
    """`make demo`'s run: ``objects`` personalized (``data.max_instances``) of the toy's test objects, all of whose
    photos are evaluated. ``size`` / ``triplets`` / ``composites`` 0 = the demo's (toy photos of 224 px); a
    ``size`` sets the toy's photo side, the model's input and composites' side, and dense maps at twice it.
    ``categories`` / ``test_per_category`` make a smaller toy than make-toy's (:func:`make_dataset`).

    The floor of train and evaluate is the better of two ways to use the cores, both timed here: one process
    with torch on every core, or one thread per core with the independent work (objects, encoders) spread over
    the cores (1-thread time / cores). On a loaded machine the threaded form can be the slower one.
    """
    from benchmarks.cutpaste import plain_loop as plain_cutpaste
    from personalization.config import load_config

    work = scratch("e2e")
    root, out = make_dataset(work, size or 224, categories, test_per_category), work / "run"
    overrides = [f"data.root={root}", f"output_dir={out}", f"data.max_instances={objects}"]
    if size:
        overrides += [
            f"model.image_size={size}",
            f"cutpaste.image_size={size}",
            f"evaluate.dense_image_size={2 * size}",
        ]
    overrides += [f"train.num_triplets={triplets}"] if triplets else []
    overrides += [f"cutpaste.images_per_instance={composites}"] if composites else []
    wall, lines = run_demo(overrides, work / "run.log")
    cfg = load_config(str(CONFIG), overrides)
    stages = parse_stages(lines)
    summary = json.loads((out / "summary.json").read_text())
    objects_run = summary["instances"]

    cores = os.cpu_count() or 1
    cut_s = timed(lambda: plain_cutpaste(cfg, work / "plain_cutpaste"))[1] / cores
    steps = cfg.train.num_triplets // cfg.train.batch_size * cfg.train.epochs
    train_all, augment_all = with_threads(cores, lambda: train_floor(cfg, floor_steps))
    train_one, augment_one = with_threads(1, lambda: train_floor(cfg, floor_steps))
    eval_all = with_threads(cores, lambda: evaluate_floor(cfg, out, objects_run))
    eval_one = with_threads(1, lambda: evaluate_floor(cfg, out, objects_run))
    floors = {
        "ingest": stages["ingest"]["seconds"],
        "cutpaste": cut_s,
        "train": min(train_all, train_one / cores) * steps * len(objects_run),
        "evaluate": min(eval_all["forward"], eval_one["forward"] / cores),
    }
    augment = min(augment_all, augment_one) * steps
    tuned = tuned_floor(overrides, out, objects_run, floor_steps)
    strict = {
        **floors,
        "train": min(floors["train"], tuned["train_step"] / cores * steps * len(objects_run)),
        "evaluate": min(floors["evaluate"], tuned["evaluate"] / cores),
    }
    result = _table(stages, floors, wall, lines, train_loops(out, cfg), eval_one, augment, summary, cfg)
    detail = f"train step {tuned['train_step']:.2f} s, evaluate {tuned['evaluate']:.1f} s on 1 thread"
    result.add("whole run: floor with the run's malloc settings", sum(strict.values()), f"s ({detail})")
    result.add("whole run: floor / actual with the run's malloc settings", sum(strict.values()) / wall, "")
    tunables = os.environ.get("GLIBC_TUNABLES")
    result.notes.append(f"the plain floor's process ran with GLIBC_TUNABLES={tunables!r}" if tunables else
                        "the plain floor's process ran with glibc's default malloc (no GLIBC_TUNABLES)")  # fmt: skip
    result.notes.insert(0, f"toy: {_describe_toy(root)}")
    result.add(f"train step floor: {cores} threads", train_all, f"s (1 thread: {train_one:.2f} s)")
    result.add(f"evaluate floor: {cores} threads", eval_all["forward"], f"s (1 thread: {eval_one['forward']:.1f} s)")
    return result


def _table(stages, floors, wall, lines, loops, evaluation, augment_per_object, summary, cfg) -> Result:
    result = Result("e2e", "compute floor / actual, whole `personalize run`", 0.0, goal=0.6)
    for name, floor in floors.items():
        actual = stages[name]["seconds"]
        result.add(f"{name}: actual", actual, "s")
        result.add(f"{name}: floor / actual", floor / actual if actual else 0.0, f"(floor {floor:.1f} s)")
    first = min(s["start"] for s in stages.values())
    last = max(s["end"] for s in stages.values())
    result.add("start-up: imports + Ray start (before the first stage)", first, "s")
    result.add("after the last stage: summary, report, Ray shutdown", wall - last, "s")
    parallel = min(len(loops), cfg.ray.max_concurrent or os.cpu_count() or 1) or 1
    result.add("train: in the loops (sum over objects)", sum(loops.values()), "s")
    result.add("train: outside the loops (Train start, model build, commit)", stages["train"]["seconds"] -
               sum(loops.values()) / parallel, f"s of wall ({parallel} at a time)")  # fmt: skip
    result.add("train: augmentation per object (plain, 1 process)", augment_per_object, "s")
    units = [at for at, line in lines if UNIT_DONE.search(line)]
    if units:
        first_unit = units[0] - stages["evaluate"]["start"]
        result.add("evaluate: before its first unit (actor start + first item)", first_unit, "s")
    result.add("evaluate: image decode + resize (plain, all encoders)", evaluation["decode"], "s")
    result.add("evaluate: dense masks and boxes (plain, all encoders)", evaluation["post"], "s")
    result.add("whole run: actual", wall, "s")
    result.add("whole run: floor", sum(floors.values()), "s")
    pretrained, personalized = summary["metrics"]["pretrained"], summary["metrics"]["personalized"]
    for key in ("classification/pr_auc", "retrieval/mrr", "detection/ap", "segmentation/ap"):
        if key in pretrained:
            result.add(f"metric {key}: pretrained -> personalized", personalized[key] - pretrained[key],
                       f"gain ({pretrained[key]:.3f} -> {personalized[key]:.3f})")  # fmt: skip
    result.notes.append(
        f"{len(summary['instances'])} toy objects personalized (data.max_instances), configs/demo.yaml, "
        f"{cfg.model.image_size} px, dense {cfg.evaluate.dense_image_size} px, {cfg.train.num_triplets} triplets, "
        f"batch {cfg.train.batch_size}; floor on {os.cpu_count()} cores in one process"
    )
    result.ratio = sum(floors.values()) / wall
    return result
