"""`personalize train`: contrastive LoRA fine-tuning of the encoder, one Ray Train run per instance.

For each selected instance the driver picks the training images and samples the triplets from their ids alone
(failing early on empty pools, before any training); then, one instance at a time, it reads the rows its
triplets use (the instance's own, filtered and projected inside the Parquet reads: :func:`instance_rows`), writes
them beside the run, and fits a ``TorchTrainer`` (several side by side, and a failing instance kept to itself:
pipelines.instances), so the driver's memory follows the instances in flight, not the dataset. Generated
positives come from ``OUT/filter/<instance>`` when ``personalize filter`` rescored the generated positives this
instance has now, else from ``OUT/generate/positives/<instance>`` (:func:`positives_paths`); ``filter.threshold``
applies when they are read (personalization.contrastive.data.read_positives). The workers run
:func:`train_loop_per_worker`, a short adapter that runs the library's plain loop
(:func:`personalization.contrastive.fit.fit`) with Ray Train's rank, device, checkpoints and reports as its hooks:
DDP through ``ray.train.torch.prepare_model`` (gloo on CPU) or a DeepSpeed ZeRO-1/2 engine. The committed
``OUT/train/<instance>/`` holds the peft adapter, ``metrics.json`` and the resolved config.

Resume: every checkpoint holds the trainable weights, the optimizer state, the step and the loss history.
A worker restarted by ``FailureConfig`` gets it back from ``ray.train.get_checkpoint()``. Across driver
restarts Ray Train V2 restores a run from ``storage_path/name``, so the run name is the instance plus a hash
of everything that shapes the run except its length (``train.epochs``, ``checkpoint_every``,
``max_failures``): re-running after a crash, or with more epochs, continues from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from personalization.artifacts import commit_stage, is_current
from personalization.config import ExperimentConfig, rebuild_config, replace, to_dict
from personalization.contrastive.data import TrainingSources
from personalization.contrastive.fit import Report, TrainableModel, build_lora_encoder, fit
from pipelines import common
from pipelines.common import InstanceFailures, ray_session, resolve_negatives, resolved, stage_dir, stage_main
from pipelines.instances import run_each, train_run_resources, without_failed
from pipelines.metrics import set_train_loss
from pipelines.resources import wants_gpu
from pipelines.training import (
    instance_rows,
    make_trainer,
    plan_triplets,
    read_run_dataset,
    restored_checkpoint,
    run_name,
    stage_inputs,
    training_sources,
    used_ids,
    write_run_inputs,
)

log = logging.getLogger("personalize.train")
STAGE = "train"


# ----------------------------------------------------------------------------------------------------------------
# Driver side


def run(
    cfg: ExperimentConfig,
    build_model: Callable[[ExperimentConfig], TrainableModel] | None = None,
) -> Path:
    """Train every selected instance; returns ``OUT/train``. ``build_model`` defaults to :func:`build_lora_encoder`."""
    instances = common.load_instances(cfg)
    cfg = resolve_negatives(cfg, instances)
    log.info("train: negatives: %s (contrastive/negatives.py says how auto picks)", cfg.train.negatives)
    inputs = stage_inputs(cfg)
    config = {"model": cfg.model, "train": cfg.train, "seed": cfg.seed, "filter": cfg.filter.threshold}
    chosen = without_failed(cfg, STAGE, common.select_instances(cfg, instances))
    # Sample every instance (ids only) before any training starts, so an empty pool fails before any Ray work.
    sources = {
        instance_id: training_sources(cfg, instance_id, instances, inputs)
        for instance_id in chosen
        if not is_current(stage_dir(cfg, STAGE, instance_id), STAGE, {**config, "instance": instance_id}, inputs)
    }
    todo = {i: plan_triplets(cfg, i, instances, inputs, sources[i]) for i in sources}

    def fit(instance_id: str) -> None:
        commit_stage(
            stage_dir(cfg, STAGE, instance_id),
            STAGE,
            {**config, "instance": instance_id},
            lambda tmp: fit_instance(
                cfg, instance_id, instances, todo[instance_id], inputs, tmp, build_model, sources=sources[instance_id],
            ),
            inputs=inputs,
            resolved_config=resolved(cfg),
        )  # fmt: skip

    cfg = replace(cfg, **{"train.use_gpu": wants_gpu(cfg, STAGE)})  # auto -> true/false, after the hash
    failures = run_each(cfg, STAGE, list(todo), fit, per_run=train_run_resources(cfg, cfg.train.use_gpu))
    if failures:
        raise InstanceFailures(STAGE, failures, finished=len(chosen) - len(failures))
    return stage_dir(cfg, STAGE)


def fit_instance(
    cfg,
    instance_id,
    instances,
    triplets,
    inputs,
    out_dir: Path,
    build_model=None,
    sources: TrainingSources | None = None,
) -> int:
    """Fit one instance with Ray Train and write the adapter and ``metrics.json`` into ``out_dir``. The rows its
    triplets use are read here, for this instance only, and handed to the workers as ``rows.parquet``."""
    storage = (stage_dir(cfg, STAGE, ".ray", instance_id)).absolute()
    name = run_name(cfg, instance_id, inputs)
    rows = instance_rows(cfg, instance_id, instances, inputs, image_ids=used_ids(triplets), sources=sources)
    data_dir = write_run_inputs(storage / f"{name}.inputs", rows, triplets)
    loop_config = {
        "config": to_dict(cfg),
        "data_dir": str(data_dir),
        "instance_id": instance_id,
        "build_model": build_model,
    }
    trainer = make_trainer(cfg, train_loop_per_worker, loop_config, name=name, storage=storage)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"train {instance_id}: the run reported no checkpoint (see {storage / name})")
    with result.checkpoint.as_directory() as checkpoint:
        checkpoint = Path(checkpoint)
        state = json.loads((checkpoint / "state.json").read_text())
        for file in (checkpoint / "adapter").iterdir():
            shutil.copy2(file, out_dir / file.name)
    metrics = {key: state[key] for key in ("loss", "steps", "samples_per_s", "start_step", "replica_hashes")}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("train %s: %d steps, final loss %.4f", instance_id, state["steps"], state["loss"][-1])
    return len(triplets)


# ----------------------------------------------------------------------------------------------------------------
# Worker side (runs inside Ray Train workers)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: :func:`personalization.contrastive.fit.fit` on this rank's device, with Ray Train's DDP
    wrap, the checkpoint it restores, and its reports (a checkpoint with each, and the sweep's extra metrics)."""
    import ray.train
    import ray.train.torch

    cfg = rebuild_config(loop_config["config"])  # the driver's config: its rules hold here too (local paths aside)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    trainable = (loop_config.get("build_model") or build_lora_encoder)(cfg)
    dataset = read_run_dataset(loop_config["data_dir"], trainable.transform, cfg)
    instance = loop_config.get("instance_id", "all")

    def on_step(metrics: dict) -> None:
        if rank == 0:  # the dashboard's Metrics view (a no-op outside Ray)
            set_train_loss(metrics["train/loss"], instance=instance)

    def on_checkpoint(report: Report) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            report.write(Path(tmp))
            # Ranks with nothing to save report metrics only; Ray merges the ranks' files into one checkpoint.
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if any(Path(tmp).iterdir()) else None
            ray.train.report(report.metrics, checkpoint=checkpoint)

    with restored_checkpoint() as resume:
        fit(
            trainable.model.to(device), dataset, cfg.train, seed=cfg.seed, device=device, rank=rank, world=world,
            wrap=ray.train.torch.prepare_model, resume=resume,
            save_model=trainable.save, on_step=on_step, on_checkpoint=on_checkpoint,
        )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    def run_in_ray(cfg: ExperimentConfig) -> Path:
        resolve_negatives(cfg)  # no negatives: stop before Ray starts
        with ray_session(cfg):
            return run(cfg)

    return stage_main(STAGE, run_in_ray, argv)


if __name__ == "__main__":
    raise SystemExit(main())
