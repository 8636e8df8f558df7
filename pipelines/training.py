"""What a contrastive training run reads and how it starts: shared by `personalize train` (one run per instance)
and `personalize sweep`'s trials (one run per trial, training its probe objects in turn).

Driver side: the upstream folders a config trains from (:func:`stage_inputs`), an instance's tables
(:func:`training_sources`), its triplets sampled from ids alone (:func:`plan_triplets`), the rows they use
(:func:`instance_rows`), written beside the run (:func:`write_run_inputs`), the run's name (:func:`run_name`) and
its ``TorchTrainer`` (:func:`make_trainer`). Worker side: the triplet dataset read back from those files
(:func:`read_run_dataset`) and the checkpoint a restarted worker resumes from (:func:`restored_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from personalization.artifacts import hash_config, input_hash, read_manifest
from personalization.config import ExperimentConfig, to_dict
from personalization.contrastive.data import (
    ID_COLUMNS,
    TrainingRows,
    TrainingSources,
    TripletDataset,
    read_training_rows,
    val_negative_instances,
)
from personalization.contrastive.triplets import sample_triplets
from pipelines.common import stage_dir
from pipelines.instances import run_name as instance_run_name
from pipelines.instances import worker_resources

log = logging.getLogger("personalize.train")
# Settings that only change how long a run goes or how it survives failures: a change keeps the run (and resumes).
_LENGTH_KEYS = ("epochs", "checkpoint_every", "max_failures", "use_gpu")


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
    """:func:`pipelines.instances.run_name` of what shapes the run, its length (``_LENGTH_KEYS``) aside."""
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in _LENGTH_KEYS}
    shape = hash_config({"model": cfg.model, "train": train, "seed": cfg.seed, "inputs": sorted(inputs.items())})
    return instance_run_name(instance_id, shape, inputs)


def write_run_inputs(data_dir: Path, rows: TrainingRows, triplets: Sequence[tuple]) -> Path:
    """``data_dir/rows.parquet`` (the rows the triplets use) and ``data_dir/triplets.json``: what the workers read."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows.table, data_dir / "rows.parquet")
    (data_dir / "triplets.json").write_text(json.dumps(list(triplets)))
    return data_dir


def used_ids(triplets: Sequence[tuple]) -> set[str]:
    return {image_id for triplet in triplets for image_id in triplet}


def read_run_dataset(data_dir: str | Path, transform: Callable, cfg: ExperimentConfig) -> TripletDataset:
    """The triplet dataset a worker trains on, from the files :func:`write_run_inputs` wrote."""
    data_dir = Path(data_dir)
    return TripletDataset(
        pq.read_table(data_dir / "rows.parquet"),
        [tuple(t) for t in json.loads((data_dir / "triplets.json").read_text())],
        transform,
        max_side=2 * cfg.model.image_size,
    )


def make_trainer(cfg: ExperimentConfig, loop: Callable, loop_config: dict, *, name: str, storage: Path, callbacks=()):
    """A ``TorchTrainer`` running ``loop(loop_config)`` on ``train.num_workers`` workers (a CPU each, or a GPU share),
    its state in ``storage/name`` (a re-run of the same name resumes it), the last two checkpoints kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    return _trainer_class()(
        loop,
        train_loop_config=loop_config,
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


def _trainer_class() -> type:
    """``TorchTrainer`` less the ``DatasetManager`` actor Ray Train starts for every run, datasets or not: a
    process (~2-3 s of CPU to start on a 2-core machine, per training run) our runs never use, since the workers
    read their triplets from Parquet themselves. Only a run without ``datasets`` drops it. Ray Train offers no
    public switch, so this filters its private default callbacks (Ray is pinned; tests/integration/test_train.py
    fails if a Ray upgrade renames them)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer


@contextlib.contextmanager
def restored_checkpoint() -> Iterator[Path | None]:
    """The folder of the checkpoint Ray Train hands a (re)started worker, or None on a fresh run.

    ``as_directory``, not ``to_directory``: the checkpoint's own folder when it is local, a temporary copy
    removed afterwards when it is remote (``to_directory`` left a copy in /tmp on every resume)."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        yield None
        return
    with restored.as_directory() as folder:
        yield Path(folder)
