"""`personalize dreambooth`: personalize Stable Diffusion for each selected instance on Ray Train.

Reads OUT/ingest (instances.json, images.parquet). Commits:
- OUT/dreambooth/class_images/<category>/: prior-preservation images of ``a photo of {category}`` from the
  pretrained generator, made once per category and shared by its instances (own manifest);
- OUT/dreambooth/<instance_id>/: a diffusers folder (mode=full) or ``pytorch_lora_weights.safetensors``
  (mode=lora), plus ``metrics.json`` (loss per step), each with its own manifest.
Each instance still to do is a one-worker TorchTrainer (one GPU, or a share of one with ``ray.instances_per_gpu``),
as many at a time as the cluster holds (pipelines.instances); an instance that fails is recorded in
OUT/dreambooth/failures.json and the others go on. The worker trains with the library's ``train_dreambooth`` (its
``DreamboothSettings`` made from the config section) and copies its folder into OUT/dreambooth/.work/ (like Ray
Train's own storage_path, OUT must be on storage every node sees); the driver then commits the instance folder
atomically. The photos travel in the train config (a few PNGs) and the class images as an object ref.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import ray
import torch

from personalization import schema
from personalization.artifacts import commit_stage, is_current
from personalization.config import ExperimentConfig
from personalization.devices import pick_device
from personalization.errors import MissingInputError
from personalization.synthesis.dreambooth import DreamboothSettings, generate_class_images, train_dreambooth
from personalization.synthesis.generators import AUTO, find_generator
from personalization.synthesis.saved_generator import DreamboothError, check_generator_dir
from pipelines import common
from pipelines.common import InstanceFailures, ray_session, resolved, stage_dir, stage_main
from pipelines.instances import run_each, run_name, worker_resources, write_failures
from pipelines.resources import wants_gpu, without_placement

STAGE = "dreambooth"
CHECKPOINT_FILE = "dreambooth_state.pt"
log = logging.getLogger(f"personalize.{STAGE}")


def load_real_photos(cfg: ExperimentConfig, instance_ids: Sequence[str]) -> dict[str, list[dict]]:
    """{instance_id: [{"image": png, "mask": png | None}]}; fails when masked DreamBooth meets a mask-less photo."""
    path = stage_dir(cfg, "ingest", "images.parquet")
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist; run `personalize ingest` first")
    table = schema.read_image_table(
        path, role="real_train", instance_id=list(instance_ids), columns=["instance_id", "image", "mask", "image_id"]
    )
    photos: dict[str, list[dict]] = {i: [] for i in instance_ids}
    for row in sorted(table.to_pylist(), key=lambda r: r["image_id"]):
        photos[row["instance_id"]].append({"image": row["image"], "mask": row["mask"]})
    for instance_id, rows in photos.items():
        if not rows:
            raise DreamboothError(f"{path}: instance {instance_id!r} has no real_train photos")
        if cfg.dreambooth.masked and any(r["mask"] is None for r in rows):
            raise DreamboothError(
                f"{path}: instance {instance_id!r} has train photos without masks, and dreambooth.masked=true needs "
                "them; add train_masks/<instance>/<stem>.png and re-run ingest, or set dreambooth.masked=false"
            )
    return photos


def _class_config(cfg: ExperimentConfig, category: str) -> dict:
    db = cfg.dreambooth
    return {
        "base_model": db.base_model,
        "category": category,
        "n": db.class_images,
        "resolution": db.resolution,
        "steps": cfg.generate.steps,
        "seed": cfg.seed,
    }


def _make_class_images(config: dict, generator_type: str) -> list[bytes]:
    images = generate_class_images(
        config["base_model"],
        config["category"],
        config["n"],
        resolution=config["resolution"],
        steps=config["steps"],
        seed=config["seed"],
        generator_type=generator_type,
    )
    return [schema.encode_png(image) for image in images]


def run_class_images(cfg: ExperimentConfig, category: str) -> Path:
    """OUT/dreambooth/class_images/<category>/class_images.parquet, made once (a Ray task, on a GPU if any)."""
    config = _class_config(cfg, category)

    def build(tmp_dir: Path) -> int:
        task = ray.remote(num_gpus=1 if wants_gpu(cfg, STAGE) else 0)(_make_class_images)
        blobs = ray.get(task.remote(config, cfg.dreambooth.generator_type))
        rows = [
            schema.make_row(
                image_id=schema.make_image_id("class", *config.values(), k),
                instance_id=f"{category}_class",
                category=category,
                role="negative",
                source="pretrained",
                image=blob,
                prompt=f"a photo of {category}",
                seed=config["seed"] + k,
                generator=config["base_model"],
            )
            for k, blob in enumerate(blobs)
        ]
        return schema.write_image_table(rows, tmp_dir / "class_images.parquet")

    out = stage_dir(cfg, STAGE, "class_images", category)
    return commit_stage(out, f"{STAGE}/class_images", config, build, resolved_config=resolved(cfg))


def _instance_config(cfg: ExperimentConfig, category: str) -> dict:
    # How often to checkpoint and how many restarts change how a run survives, not what it makes; generator_type
    # auto is what base_model (hashed) detects, so it stays out as before the key existed.
    skip = {"checkpoint_every", "max_failures"}
    if cfg.dreambooth.generator_type == AUTO:
        skip.add("generator_type")
    return {
        "dreambooth": {k: v for k, v in without_placement(cfg.dreambooth).items() if k not in skip},
        "category": category,
        "seed": cfg.seed,
        "class_images": _class_config(cfg, category) if _uses_prior(cfg) else None,
    }


def _uses_prior(cfg: ExperimentConfig) -> bool:
    return cfg.dreambooth.prior_preservation and cfg.dreambooth.class_images > 0 and cfg.dreambooth.prior_weight > 0


def train_worker(config: dict) -> None:
    """Ray Train worker: trains the run's one instance and leaves its folder in the run's work folder.

    Every ``checkpoint_every`` steps it reports a checkpoint (trained weights, optimizer, step, random states);
    a restarted worker (``FailureConfig``) resumes from the last one and ends with the same weights."""
    import ray.train  # ~1 s to import: only the training workers and fit_instance need it

    job = config["job"]
    images = [schema.decode_image(p["image"]) for p in job["photos"]]
    masks = [schema.decode_mask(p["mask"]) if p["mask"] is not None else None for p in job["photos"]]
    class_images = [schema.decode_image(b) for b in ray.get(job["class_ref"])] if job["class_ref"] else []
    settings = config["settings"].replace(device=pick_device().type)
    resume = None
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)
        log.info("dreambooth %s: resuming at step %d", job["instance_id"], resume["step"])

    def on_checkpoint(state: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"loss": state["losses"][-1], "step": state["step"]}, checkpoint=checkpoint)

    # Straight into the run's shared work folder (the storage Ray Train itself needs), complete or not at all.
    final = Path(config["work_dir"]) / job["instance_id"]
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = train_dreambooth(
        config["base_model"],
        images,
        job["category"],
        partial,
        settings,
        masks=masks,
        class_images=class_images,
        checkpoint_every=config["checkpoint_every"],
        on_checkpoint=on_checkpoint,
        resume=resume,
    )
    (partial / "metrics.json").write_text(json.dumps({"dreambooth/loss": result["losses"]}))
    partial.rename(final)
    ray.train.report({"loss": result["losses"][-1], "step": len(result["losses"])})


def run(cfg: ExperimentConfig) -> Path:
    instances = common.load_instances(cfg)
    instance_ids = common.select_instances(cfg, instances)
    check_generator_dir(cfg.dreambooth.base_model)
    find_generator(cfg.dreambooth.base_model, cfg.dreambooth.generator_type)  # an unknown model family fails here
    photos = load_real_photos(cfg, instance_ids)  # bad input fails here, before any worker starts
    inputs = {"ingest": stage_dir(cfg, "ingest")}
    outs = {i: stage_dir(cfg, STAGE, i) for i in instance_ids}
    configs = {i: _instance_config(cfg, instances[i]["category"]) for i in instance_ids}
    todo = [i for i in instance_ids if not is_current(outs[i], STAGE, configs[i], inputs)]
    if not todo:
        write_failures(cfg, STAGE, {}, selected=instance_ids)
        return stage_dir(cfg, STAGE)
    with ray_session(cfg):
        class_refs = {}
        for category in sorted({instances[i]["category"] for i in todo}) if _uses_prior(cfg) else []:
            table = schema.read_image_table(run_class_images(cfg, category), columns=["image"])
            class_refs[category] = ray.put(table.column("image").to_pylist())
        use_gpu = wants_gpu(cfg, STAGE)
        log.info("dreambooth: training %s (%s, %d steps)", todo, cfg.dreambooth.mode, cfg.dreambooth.steps)

        def fit(instance_id: str) -> None:
            job = {
                "instance_id": instance_id,
                "category": instances[instance_id]["category"],
                "photos": photos[instance_id],
                "class_ref": class_refs.get(instances[instance_id]["category"]),
            }
            name = run_name(instance_id, configs[instance_id], inputs)
            commit_stage(
                outs[instance_id],
                STAGE,
                configs[instance_id],
                lambda tmp: fit_instance(cfg, job, tmp, use_gpu, name=name),
                inputs=inputs,
                resolved_config=resolved(cfg),
            )

        failures = run_each(cfg, STAGE, todo, fit, per_run=worker_resources(cfg, use_gpu))
    for scratch in (".work", ".ray"):  # gone once no run needs them (a failed run's checkpoints stay)
        with contextlib.suppress(OSError):
            stage_dir(cfg, STAGE, scratch).rmdir()
    if failures:
        raise InstanceFailures(STAGE, failures, finished=len(todo) - len(failures))
    return stage_dir(cfg, STAGE)


def fit_instance(cfg: ExperimentConfig, job: dict, out_dir: Path, use_gpu: bool, *, name: str) -> None:
    """One instance's DreamBooth as a one-worker Ray Train run ``name``; its folder lands in ``out_dir``.

    The run's checkpoints (``OUT/dreambooth/.ray/<instance>/``) are removed once the folder is out, and kept when
    the run fails or is interrupted, for the next run to resume from."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # ~1 s: training only
    from ray.train.torch import TorchTrainer

    instance_id = job["instance_id"]
    storage = stage_dir(cfg, STAGE, ".ray", instance_id).resolve()
    work_dir = stage_dir(cfg, STAGE, ".work", instance_id).resolve()
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "job": job,
            "base_model": cfg.dreambooth.base_model,
            "settings": DreamboothSettings.from_config(cfg.dreambooth, seed=cfg.seed),
            "checkpoint_every": cfg.dreambooth.checkpoint_every,
            "work_dir": str(work_dir),
        },
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=use_gpu, resources_per_worker=worker_resources(cfg, use_gpu)
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=cfg.dreambooth.max_failures),
        ),
    )
    try:
        trainer.fit()
        source = work_dir / instance_id
        if not source.is_dir():
            raise RuntimeError(f"dreambooth: the worker for {instance_id} wrote nothing to {work_dir}")
        for entry in source.iterdir():  # a rename where it can (same file system), not a copy of the weights
            shutil.move(entry, out_dir / entry.name)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)
