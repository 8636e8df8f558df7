"""`generate` throughput: the Ray Data stage (one ImageSampler actor, filter off and on) against a plain loop.

Model: the zoo's tiny SD 1.5-shaped pipeline (``build_zoo(dir, parts=["stable_diffusion"])``), DPM-Solver, CFG 5.
Candidate: ``pipelines.generation.run_generation`` (rows -> ImageSampler actor pool [-> Scorer actor pool] ->
Parquet), the code path of ``personalize generate``. Baseline: ``StableDiffusionPipeline`` called in a plain
loop over the same prompts, seeds, steps, size and batch, each image PNG-encoded (the stage stores PNG bytes);
with the filter on, the plain loop also scores each batch with the same ``Scorer`` class, in line.

Each side runs once untimed at one batch (warm-up: lazy imports, file caches), then ``repeats`` times at ``n``
images, alternating (plain loop, stage) pairs, with the same torch thread count; each figure is the median over
the repeats and the headline is the median of the per-pair steady-state ratios. End to end = images / wall
seconds from the call to its return (model load and, for the stage, actor start included). Steady state is
measured inside each stream: the plain loop stamps the clock after each batch; the stage writes one Parquet
shard per batch as the stream runs, and a shard's modification time is its stamp. ``stream_rate`` fits time
against images made over all stamps but the first, so start-up drops out of both sides alike, without
differencing two separately timed runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import Result, local_ray, ratio, scratch, stream_rate, timed, zoo_dir

INSTANCE, CATEGORY, PROMPT = "mug_00", "mug", "a photo of <new1> mug"
Stamp = tuple[float, int]  # (wall-clock time, images made so far)


def _real_table(out: Path, size: int) -> Path:
    """Three random real_train photos with masks for INSTANCE (the filter's references)."""
    from PIL import Image

    from personalization.schema import make_row, write_image_table

    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), bool)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    rows = [
        make_row(
            image_id=f"real-{k}", instance_id=INSTANCE, category=CATEGORY, role="real_train", source="real",
            split="train", instance_split="test",
            image=Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), mask=mask,
        )
        for k in range(3)
    ]  # fmt: skip
    path = out / "ingest" / "images.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image_table(rows, path)
    return path


def plain_loop(sd: str, rows: list[dict], *, steps: int, size: int, batch: int, scorer=None) -> list[Stamp]:
    """The simplest correct generator: load the pipeline, call it batch by batch, PNG-encode (and score).
    Returns a ``(time, images made so far)`` stamp per batch."""
    import diffusers
    import torch

    from personalization.schema import decode_image, encode_png

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    made, stamps = 0, []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        generators = [torch.Generator().manual_seed(int(r["seed"])) for r in chunk]
        with torch.inference_mode():
            images = pipe(
                [r["prompt"] for r in chunk], num_inference_steps=steps, guidance_scale=float(chunk[0]["cfg"]),
                height=size, width=size, generator=generators, output_type="np",
            ).images  # fmt: skip
        blobs = [encode_png(np.clip(np.round(im * 255), 0, 255).astype(np.uint8)) for im in images]
        if scorer is not None:
            scorer.score_images(INSTANCE, [decode_image(b) for b in blobs])
        made += len(blobs)
        stamps.append((time.time(), made))
    return stamps


def shard_stamps(folder: Path) -> list[Stamp]:
    """The stage's stamps: each Parquet shard's modification time with the rows written up to it."""
    from personalization.schema import read_image_table

    shards = sorted(folder.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    stamps, made = [], 0
    for shard in shards:
        made += read_image_table(shard, columns=["image_id"]).num_rows
        stamps.append((shard.stat().st_mtime, made))
    return stamps


def stream(run: Callable[[int], list[Stamp]], n: int) -> tuple[float, float, float]:
    """``run(n)`` timed; returns (end-to-end images/s, steady-state images/s from its stamps, start-up seconds =
    wall - images / steady state)."""
    stamps, wall = timed(lambda: run(n))
    made = stamps[-1][1] if stamps else 0
    steady = stream_rate(stamps)
    return made / wall, steady, wall - made / steady


def alternate(base: Callable[[int], list[Stamp]], cand: Callable[[int], list[Stamp]], n: int, first: int, repeats: int):
    """Both sides once untimed at ``first`` images (warm-up: lazy imports, file caches), then ``repeats`` pairs
    (baseline, candidate) back to back, so slow drifts in machine load hit both sides of a pair alike.

    Returns (baseline medians, candidate medians, per-pair steady-state ratios); medians of
    (end-to-end, steady state, start-up) over the repeats."""
    base(first)
    cand(first)
    pairs = [(stream(base, n), stream(cand, n)) for _ in range(repeats)]
    medians = [
        tuple(float(np.median(column)) for column in zip(*side, strict=True)) for side in zip(*pairs, strict=True)
    ]
    return medians[0], medians[1], [ratio(c[1], b[1]) for b, c in pairs]


def measure(
    n_images: int = 80, n_filtered: int = 20, steps: int = 10, size: int = 32, batch: int = 4, repeats: int = 3
) -> Result:
    import torch

    from personalization.config import build_config
    from personalization.filtering.scorer import Scorer
    from personalization.synthesis.generation_rows import make_generation_rows
    from personalization.zoo import build_zoo
    from pipelines.common import scorer_kwargs
    from pipelines.generation import run_generation

    parts = build_zoo(zoo_dir(), parts=["stable_diffusion", "dreamsim"] if n_filtered else ["stable_diffusion"])
    sd = str(parts["stable_diffusion"])
    out = scratch("generate")
    _real_table(out, 64)
    cfg = build_config(
        {
            "output_dir": str(out),
            "dreambooth": {"base_model": sd},
            "generate": {"enabled": True, "steps": steps, "image_size": size, "batch_size": batch,
                         "num_actors": 1, "gpus_per_actor": 0.0, "guidance_scale": 5.0,
                         "positives_per_instance": n_filtered, "max_attempts": max(n_filtered, 1)},
            "filter": {"enabled": False, "cache_dir": str(parts.get("dreamsim", "")), "dreamsim_type": "clip_vitb32",
                       "masker": "patch", "threshold": 0.0, "num_actors": 1, "batch_size": batch},
        }
    )  # fmt: skip

    def rows(n: int) -> list[dict]:
        return make_generation_rows(INSTANCE, CATEGORY, [PROMPT], n, generator=sd, cfg=5.0, seed=0)

    result = Result("generate", "ray stage / plain loop, steady-state images/s (1 actor, filter off)", 0.0, goal=0.9)
    threads = torch.get_num_threads()
    runs = iter(range(1000))

    def stage(n: int, filtered: bool = False) -> list[Stamp]:
        extra = {"scorer_kwargs": scorer_kwargs(cfg), "needed": {INSTANCE: n}} if filtered else {}
        folder = out / f"run-{next(runs)}"
        written = run_generation(cfg, rows(n), folder, base_model=sd, **extra)
        stamps = shard_stamps(folder)
        if not stamps or stamps[-1][1] != written:
            raise RuntimeError(f"{folder}: the shards hold {stamps[-1:]} rows, the stage reported {written}")
        return stamps

    with local_ray():
        import ray

        @ray.remote(num_cpus=1)
        def actor_threads() -> int:
            return torch.get_num_threads()

        ray_threads = ray.get(actor_threads.remote())
        # Same thread count on both sides: the plain loop runs with what a Ray worker gets.
        torch.set_num_threads(ray_threads)
        try:
            loop = {"steps": steps, "size": size, "batch": batch}
            base, cand, pair_ratios = alternate(
                lambda n: plain_loop(sd, rows(n), **loop), stage, n_images, batch, repeats
            )
            _report(result, "plain loop", base)
            _report(result, "ray stage, filter off", cand)
            result.add("end-to-end ratio, filter off", ratio(cand[0], base[0]), f"at {n_images} images")
            if n_filtered:
                scorer = Scorer(**{k: v for k, v in scorer_kwargs(cfg).items() if k != "sam_weights"})
                fbase, fcand, _ = alternate(
                    lambda n: plain_loop(sd, rows(n), **loop, scorer=scorer), lambda n: stage(n, filtered=True),
                    n_filtered, batch, 1,
                )  # fmt: skip
                _report(result, "plain loop + in-line DreamSim scoring", fbase)
                _report(result, "ray stage, filter on (2 pools)", fcand)
                result.add("end-to-end ratio, filter on", ratio(fcand[0], fbase[0]), f"at {n_filtered} images")
                result.add("steady-state ratio, filter on", ratio(fcand[1], fbase[1]), "")
        finally:
            torch.set_num_threads(threads)
    result.notes.append(
        f"tiny SD, {size} px, {steps} steps, CFG 5, batch {batch}; {n_images} images (filter off), {n_filtered} "
        f"(filter on, ViT-B/32 DreamSim, patch masker); torch threads {ray_threads} on both sides"
    )
    result.notes.append(
        f"filter off: {repeats} alternating (plain loop, stage) pairs, medians shown; steady-state ratio per pair: "
        + ", ".join(f"{r:.3f}" for r in pair_ratios)
        + "; the headline is their median"
    )
    result.notes.append(
        "steady state = 1 / slope of a least-squares fit of stamp time against images made, over all batches but "
        "the first (plain loop: clock after each batch; stage: each shard's write time); start-up = the rest"
    )
    result.ratio = float(np.median(pair_ratios))
    if not (math.isfinite(cand[1]) and math.isfinite(base[1])):  # a single batch: no stream to measure inside
        result.ratio = ratio(cand[0], base[0])
        result.notes.append("too few batches for a steady state; the headline is end to end")
    return result


def _report(result: Result, label: str, measured: tuple[float, float, float]) -> None:
    end_to_end, steady, fixed = measured
    result.add(f"{label}: end-to-end", end_to_end, "images/s")
    result.add(f"{label}: steady state", steady, "images/s")
    result.add(f"{label}: start-up", fixed, "s")
