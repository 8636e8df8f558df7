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

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import pyarrow.parquet as pq
import torch

from personalization.artifacts import commit_stage, hash_config, input_hash, is_current, read_manifest
from personalization.config import ExperimentConfig, build_config, replace, to_dict
from personalization.contrastive import TripletDataset, sample_triplets
from personalization.contrastive.data import (
    ID_COLUMNS,
    TrainingRows,
    TrainingSources,
    read_training_rows,
    val_negative_instances,
)
from personalization.contrastive.fit import Report, TrainableModel, build_lora_encoder, fit
from pipelines import common
from pipelines.common import InstanceFailures, ray_session, resolve_negatives, resolved, stage_dir, stage_main
from pipelines.instances import run_each, without_failed, worker_resources
from pipelines.metrics import set_train_loss
from pipelines.resources import wants_gpu

log = logging.getLogger("personalize.train")
STAGE = "train"
# Settings that only change how long a run goes or how it survives failures: a change keeps the run (and resumes).
_LENGTH_KEYS = ("epochs", "checkpoint_every", "max_failures", "use_gpu")


# ----------------------------------------------------------------------------------------------------------------
# Driver side


def stage_inputs(cfg: ExperimentConfig) -> dict[str, Path]:
    """The upstream folders this config reads (only those it needs and that exist). ``filter`` is there when
    ``personalize filter`` has run, so rescoring retrains (:func:`positives_paths` says which rows are used)."""
    inputs = {"ingest": stage_dir(cfg, "ingest")}
    sources = set(cfg.train.positive_sources)
    if "cutpaste" in sources or cfg.train.negatives == "val":
        inputs["cutpaste"] = stage_dir(cfg, "cutpaste")
    if sources & {"dreambooth", "masked_dreambooth"} or cfg.train.negatives == "generated":
        inputs["generate"] = stage_dir(cfg, "generate")
        inputs["filter"] = stage_dir(cfg, "filter")
    if cfg.train.negatives == "folder":
        inputs["negatives"] = Path(cfg.train.negatives_dir)
    if "released" in sources:
        inputs["released"] = Path(cfg.train.positives_dir)
    required = {"ingest"} | ({"cutpaste"} & sources) | ({"generate"} if "generate" in inputs else set())
    missing = [name for name in required if not inputs[name].exists()]
    if missing:
        raise FileNotFoundError(
            f"train needs {[str(inputs[m]) for m in missing]}: run `personalize {missing[0]}` first"
        )
    return {name: path for name, path in inputs.items() if path.exists()}


def _unit_paths(root: Path, units: Sequence[str]) -> list[Path]:
    """The committed folders of ``units`` under a per-unit stage folder (``OUT/cutpaste/<instance>/``), or
    ``root`` itself when it holds one flat table (an older layout; the reads still filter by instance)."""
    if not root.exists():
        return []
    if root.is_file() or any(root.glob("*.parquet")):
        return [root]
    return [root / unit for unit in units if (root / unit).is_dir()]


def positives_paths(cfg: ExperimentConfig, instance_id: str) -> list[Path]:
    """Where ``instance_id``'s generated positives are read: ``OUT/filter/<instance>`` when `personalize filter`
    scored exactly the positives ``OUT/generate/positives/<instance>`` holds now (its manifest's ``generate``
    input hash is theirs), else the generated ones (a stale rescoring is named in the log)."""
    generated = stage_dir(cfg, "generate", "positives")
    rescored = stage_dir(cfg, "filter", instance_id)
    scored_from = (read_manifest(rescored) or {}).get("inputs", {}).get("generate")
    if scored_from is not None and (generated / instance_id).is_dir():
        if scored_from == input_hash(generated / instance_id):
            return [rescored]
        log.warning(
            "train %s: %s scored other generated images than %s holds now; training on the generated ones "
            "(run `personalize filter` again to rescore them)", instance_id, rescored, generated / instance_id,
        )  # fmt: skip
    return _unit_paths(generated, [instance_id])


def training_sources(cfg: ExperimentConfig, instance_id: str, instances: dict[str, dict], inputs) -> TrainingSources:
    """The tables ``instance_id`` trains from: its own units (and its category's) only."""
    category = instances[instance_id]["category"]
    val = val_negative_instances(instances, instance_id) if cfg.train.negatives == "val" else []
    generated = inputs.get("generate")
    return TrainingSources(
        real=stage_dir(cfg, "ingest", "images.parquet"),
        cutpaste=_unit_paths(inputs["cutpaste"], [instance_id, *val]) if "cutpaste" in inputs else [],
        positives=positives_paths(cfg, instance_id) if generated else [],
        negatives=_unit_paths(generated / "negatives", [category]) if generated else [],
        threshold=cfg.filter.threshold,
        released=cfg.train.positives_dir,
    )


def instance_rows(
    cfg: ExperimentConfig,
    instance_id: str,
    instances: dict[str, dict],
    inputs: dict[str, Path],
    *,
    columns: Sequence[str] | None = None,
    image_ids: Collection[str] | None = None,
    sources: TrainingSources | None = None,
) -> TrainingRows:
    """The rows ``instance_id`` trains on, read from its own units with filters and projection pushed into
    Parquet (:func:`personalization.contrastive.data.read_training_rows`): ``columns=ID_COLUMNS`` to plan, then
    ``image_ids`` = the triplets' ids for the run (what ``rows.parquet`` holds). ``sources``: the instance's
    :func:`training_sources` when the caller has them (train finds them once per instance, for both reads)."""
    sources = sources or training_sources(cfg, instance_id, instances, inputs)
    return read_training_rows(sources, instance_id, cfg.train, instances, columns=columns, image_ids=image_ids)


def plan_triplets(
    cfg: ExperimentConfig, instance_id: str, instances: dict[str, dict], inputs, sources: TrainingSources | None = None
) -> list[tuple]:
    """``instance_id``'s triplets, sampled from the ids of its rows (no image is read)."""
    rows = instance_rows(cfg, instance_id, instances, inputs, columns=ID_COLUMNS, sources=sources)
    return sample_triplets(
        rows.anchor_ids, rows.positive_ids, rows.negative_ids, num_triplets=cfg.train.num_triplets,
        num_positives=cfg.train.num_positives, num_negatives=cfg.train.num_negatives,
        num_pairs=cfg.train.num_pairs, seed=cfg.seed, instance_id=instance_id,
        positive_groups=rows.positive_ids_by_source, source_weights=cfg.train.source_weights,
    )  # fmt: skip


def run_name(cfg: ExperimentConfig, instance_id: str, inputs: dict[str, Path]) -> str:
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in _LENGTH_KEYS}
    key = hash_config({"model": cfg.model, "train": train, "seed": cfg.seed, "inputs": sorted(inputs.items())})
    key = hash_config([key, {name: input_hash(path) for name, path in inputs.items()}])
    return f"{instance_id}-{key[:12]}"


def run(
    cfg: ExperimentConfig,
    build_model: Callable[[ExperimentConfig], TrainableModel] | None = None,
    *,
    callbacks: Sequence = (),
    report_extra: Callable[[torch.nn.Module], dict] | None = None,
) -> Path:
    """Train every selected instance; returns ``OUT/train``. ``build_model`` defaults to :func:`build_lora_encoder`.

    Hooks (used by `personalize sweep`): ``callbacks`` are Ray Train ``UserCallback``s for the TorchTrainer (e.g.
    Tune's ``TuneReportCallback``); ``report_extra(model) -> {key: value}`` runs on rank 0 before every report
    and its metrics are added to that report (e.g. a validation metric for early stopping).
    """
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
                cfg, instance_id, instances, todo[instance_id], inputs, tmp, build_model, callbacks=callbacks,
                report_extra=report_extra, sources=sources[instance_id],
            ),
            inputs=inputs,
            resolved_config=resolved(cfg),
        )  # fmt: skip

    cfg = replace(cfg, **{"train.use_gpu": wants_gpu(cfg, STAGE)})  # auto -> true/false, after the hash
    per_worker = worker_resources(cfg, cfg.train.use_gpu)
    per_run = {key: amount * cfg.train.num_workers for key, amount in per_worker.items()}
    failures = run_each(cfg, STAGE, list(todo), fit, per_run=per_run)
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
    callbacks=(),
    report_extra=None,
    sources: TrainingSources | None = None,
) -> int:
    """Fit one instance with Ray Train and write the adapter and ``metrics.json`` into ``out_dir``. The rows its
    triplets use are read here, for this instance only, and handed to the workers as ``rows.parquet``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = (stage_dir(cfg, STAGE, ".ray", instance_id)).absolute()
    name = run_name(cfg, instance_id, inputs)
    data_dir = storage / f"{name}.inputs"
    data_dir.mkdir(parents=True, exist_ok=True)
    used = {image_id for triplet in triplets for image_id in triplet}
    rows = instance_rows(cfg, instance_id, instances, inputs, image_ids=used, sources=sources)
    pq.write_table(rows.table, data_dir / "rows.parquet")
    (data_dir / "triplets.json").write_text(json.dumps(triplets))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "data_dir": str(data_dir),
            "instance_id": instance_id,
            "build_model": build_model,
            "report_extra": report_extra,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=worker_resources(cfg, cfg.train.use_gpu),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
    )
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

    cfg = build_config(loop_config["config"])  # the driver's whole config: its cross-section rules hold here too
    data_dir = Path(loop_config["data_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    trainable = (loop_config.get("build_model") or build_lora_encoder)(cfg)
    dataset = TripletDataset(
        pq.read_table(data_dir / "rows.parquet"),
        [tuple(t) for t in json.loads((data_dir / "triplets.json").read_text())],
        trainable.transform,
        max_side=2 * cfg.model.image_size,
    )
    report_extra, instance = loop_config.get("report_extra"), loop_config.get("instance_id", "all")

    def on_step(metrics: dict) -> None:
        if rank == 0:  # the dashboard's Metrics view (a no-op outside Ray)
            set_train_loss(metrics["train/loss"], instance=instance)

    def on_checkpoint(report: Report) -> None:
        metrics = report.metrics
        if rank == 0 and report_extra is not None:
            metrics = {**metrics, **report_extra(report.model)}
        with tempfile.TemporaryDirectory() as tmp:
            report.write(Path(tmp))
            # Ranks with nothing to save report metrics only; Ray merges the ranks' files into one checkpoint.
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if any(Path(tmp).iterdir()) else None
            ray.train.report(metrics, checkpoint=checkpoint)

    restored = ray.train.get_checkpoint()
    # as_directory, not to_directory: the checkpoint's own folder when it is local, a temporary copy removed
    # afterwards when it is remote (to_directory left a copy in /tmp on every resume).
    with restored.as_directory() if restored is not None else contextlib.nullcontext() as resume:
        fit(
            trainable.model.to(device), dataset, cfg.train, seed=cfg.seed, device=device, rank=rank, world=world,
            wrap=ray.train.torch.prepare_model, resume=Path(resume) if resume is not None else None,
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
