"""One `personalize sweep` trial: one Ray Train run that trains every probe object epoch by epoch, and one value
per epoch for Tune.

The trial (a Tune function trainable) plans each probe's triplets on the shared outputs exactly as `personalize
train` does (pipelines/training.py), writes them to ``trials/<id>/inputs/<probe>/`` and starts **one**
``TorchTrainer``, whose workers run :func:`probe_loop_per_worker`: for epoch e = 1..E, each probe in turn is built,
resumed from its state after epoch e-1 and trained to the end of epoch e (``fit`` with ``train.epochs=e``: the
draws of an uninterrupted run), then scored on rank 0 (``val/pr_auc``: :class:`ValidationProbe` over the probes'
photos only, so the pool never serves as a distractor). After the last probe of an epoch the workers report the
mean over probes with one checkpoint holding every probe's state; Tune's ``TuneReportCallback`` hands the report
to the trial, so ASHA compares trials after every epoch and a stopped trial trains no further. One trainer start
per trial, whatever the number of probes and epochs.

Negatives: the trial's ``ingest`` links to the sweep's probe view of the ingest stage (``instances.json`` with the
probes hidden from the val split), so ``train.negatives=val`` draws from the pool only. Rank 0 writes
``trials/<id>/probes.json`` after every epoch (probes, pool, each probe's distractors, per-epoch ``val/pr_auc`` and
``train/loss``); a finished trial commits each probe's adapter to ``trials/<id>/train/<probe>/``. Resume: the
trainer's run is named by the trial's config, so a restarted trial (``Tuner.restore``) continues from its last
epoch checkpoint; ASHA counts epochs (the reports' ``epoch``), not reports, so it is not misled by the epochs a
restarted trial does not report again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import ray.tune
import ray.util
import torch

from personalization.artifacts import commit_stage, hash_config, write_json_atomic
from personalization.config import ExperimentConfig, rebuild_config, replace, to_dict
from personalization.contrastive.fit import build_lora_encoder, fit
from personalization.errors import MissingInputError
from personalization.evaluation.probe import ValidationProbe
from personalization.sweeps import nest
from pipelines import common
from pipelines.common import resolve_negatives, resolved
from pipelines.resources import wants_gpu
from pipelines.training import (
    instance_rows,
    make_trainer,
    plan_triplets,
    read_run_dataset,
    restored_checkpoint,
    stage_inputs,
    training_sources,
    used_ids,
    write_run_inputs,
)

PROBE_INGEST = "ingest-probes"  # OUT/sweep/shared/<this>: the ingest stage as the probes' training sees it
RECORD = "probes.json"
METRIC_KEYS = ("val/pr_auc", "train/loss")


def generate_key(cfg: ExperimentConfig, base: ExperimentConfig) -> str:
    """Content hash of what the generate stage makes (filter.threshold excluded: it is applied on read)."""
    filter_cfg = {**to_dict(cfg.filter), "threshold": base.filter.threshold}
    return hash_config({"generate": to_dict(cfg.generate), "filter": filter_cfg})[:16]


def link_upstream(folder: Path, links: dict[str, Path]) -> None:
    """``folder/<name>`` -> ``target`` symlinks, so stages read shared outputs through their usual paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = folder / name
        if link.is_symlink() and Path(os.readlink(link)) == target.resolve():
            continue
        if link.is_symlink():
            link.unlink()
        if target.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)


def trial_links(cfg: ExperimentConfig, base: ExperimentConfig, params: dict) -> dict[str, Path]:
    shared = Path(base.output_dir)
    links = {"ingest": shared / PROBE_INGEST, "cutpaste": shared / "cutpaste", "dreambooth": shared / "dreambooth"}
    if cfg.generate.enabled:
        cached = shared / "generate-cache" / generate_key(cfg, base) / "generate"
        if not cached.is_dir():
            raise MissingInputError(f"sweep: no cached generate output {cached} for {params}")
        links["generate"] = cached
    return links


# ----------------------------------------------------------------------------------------------------------------
# The trial (Tune's function trainable, on the driver's cluster)


def run_trial(params: dict, *, base: dict, probes: list[str], pool: list[str]) -> None:
    """One Tune trial: the base config plus ``params`` (dotted keys), every probe trained on the shared outputs."""
    from ray.tune.integration.ray_train import TuneReportCallback

    base_cfg = rebuild_config(base)
    cfg = rebuild_config(base, nest(params))
    out = Path(base_cfg.output_dir).parent / "trials" / ray.tune.get_context().get_trial_id()
    link_upstream(out, trial_links(cfg, base_cfg, params))
    cfg = replace(cfg, output_dir=str(out))
    instances = common.load_instances(cfg)
    cfg = resolve_negatives(cfg, instances)
    inputs = stage_inputs(cfg)
    data_dirs = {probe: str(plan_probe(cfg, probe, instances, inputs, out / "inputs" / probe)) for probe in probes}
    cfg = replace(cfg, **{"train.use_gpu": wants_gpu(cfg, "train")})
    loop_config = {
        "config": to_dict(cfg),
        "data_dirs": data_dirs,
        "images": str(Path(base_cfg.output_dir) / "ingest" / "images.parquet"),
        "probes": list(probes),
        "pool": list(pool),
        "record": str(out / RECORD),
    }
    name = "probes-" + hash_config({k: v for k, v in loop_config.items() if k != "config"} | {"params": params})[:12]
    trainer = make_trainer(
        cfg, probe_loop_per_worker, loop_config, name=name, storage=out / "train" / ".ray",
        callbacks=[TuneReportCallback()],
    )  # fmt: skip
    result = trainer.fit()
    with result.checkpoint.as_directory() as checkpoint:
        commit_adapters(cfg, Path(checkpoint), probes, inputs)


def plan_probe(cfg: ExperimentConfig, probe: str, instances: dict, inputs: dict, data_dir: Path) -> Path:
    """``probe``'s triplets and the rows they use, written to ``data_dir`` for the workers (as train does)."""
    sources = training_sources(cfg, probe, instances, inputs)
    triplets = plan_triplets(cfg, probe, instances, inputs, sources)
    rows = instance_rows(cfg, probe, instances, inputs, image_ids=used_ids(triplets), sources=sources)
    return write_run_inputs(data_dir, rows, triplets)


def commit_adapters(cfg: ExperimentConfig, checkpoint: Path, probes: list[str], inputs: dict) -> None:
    """``trials/<id>/train/<probe>/``: each probe's final adapter and its loss history, committed like train's."""
    config = {"model": cfg.model, "train": cfg.train, "seed": cfg.seed, "filter": cfg.filter.threshold}
    for probe in probes:

        def build(tmp: Path, probe=probe) -> int:
            shutil.copytree(checkpoint / probe / "adapter", tmp, dirs_exist_ok=True)
            state = json.loads((checkpoint / probe / "state.json").read_text())
            (tmp / "metrics.json").write_text(json.dumps({k: state[k] for k in ("loss", "steps")}, indent=2))
            return state["steps"]

        commit_stage(
            Path(cfg.output_dir) / "train" / probe, "train", {**config, "instance": probe}, build,
            inputs=inputs, resolved_config=resolved(cfg),
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Workers (inside the trial's Ray Train run)


def probe_loop_per_worker(loop_config: dict) -> None:
    """Every probe, epoch by epoch, each resumed from its state after the previous epoch; one report per epoch.

    Each rank keeps the probes' states in a local folder (after every probe-epoch the ranks exchange what they
    wrote, so DeepSpeed's per-rank shards and rank 0's weights are on every rank); rank 0 reports it as the
    checkpoint. A restarted worker group starts from the last reported one."""
    import ray.train
    import ray.train.torch

    cfg = rebuild_config(loop_config["config"])
    probes, rank = loop_config["probes"], ray.train.get_context().get_world_rank()
    scorers = {p: ValidationProbe(loop_config["images"], p, to_dict(cfg.model), instances=probes) for p in probes}
    with tempfile.TemporaryDirectory() as work, restored_checkpoint() as restored:
        work = Path(work)
        if restored is not None:
            shutil.copytree(restored, work, dirs_exist_ok=True)
        record = load_record(work / RECORD, loop_config)
        done = min(len(values) for values in record["val/pr_auc"].values())
        # Every epoch done already (a trial restarted after its last report): report the last one again.
        for epoch in range(min(done + 1, cfg.train.epochs), cfg.train.epochs + 1):
            for probe in probes if epoch > done else ():
                metrics = train_probe_epoch(cfg, loop_config["data_dirs"][probe], work / probe, epoch, scorers[probe])
                if rank == 0:
                    add_to_record(record, probe, metrics)
            report = epoch_report(record, epoch) if rank == 0 else {"epoch": epoch}
            group = ray.util.get_current_placement_group()
            report["placement_group"] = group.id.hex() if group is not None else ""
            if rank == 0:
                write_json_atomic(work / RECORD, record)
            checkpoint = ray.train.Checkpoint.from_directory(work) if rank == 0 else None
            ray.train.report(report, checkpoint=checkpoint)
            if rank == 0:
                write_json_atomic(loop_config["record"], record)


def train_probe_epoch(cfg: ExperimentConfig, data_dir: str, state: Path, epoch: int, scorer) -> dict:
    """Train one probe from its state after ``epoch - 1`` (``state``; none before the first) to the end of
    ``epoch``, replace ``state`` with the new one; rank 0 returns the loss and the probe's ``val/pr_auc``."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    trainable = build_lora_encoder(cfg)
    dataset = read_run_dataset(data_dir, trainable.transform, cfg)
    following = state.with_name(state.name + ".next")
    metrics: dict = {}

    def on_checkpoint(report) -> None:
        if not report.final:  # a sweep keeps the state of whole epochs only
            return
        shutil.rmtree(following, ignore_errors=True)
        following.mkdir()
        report.write(following)
        share_folder(following, world)
        if rank == 0:
            metrics.update(report.metrics)
            metrics.update(scorer(report.model))
            metrics["val/scored"] = ",".join(scorer.scored_instances)

    fit(
        trainable.model.to(device), dataset, replace(cfg, **{"train.epochs": epoch}).train, seed=cfg.seed,
        device=device, rank=rank, world=world, wrap=ray.train.torch.prepare_model,
        resume=state if (state / "state.json").is_file() else None, save_model=trainable.save,
        on_checkpoint=on_checkpoint,
    )  # fmt: skip
    shutil.rmtree(state, ignore_errors=True)
    following.rename(state)
    return metrics


def share_folder(folder: Path, world: int) -> None:
    """Give every rank the files every rank wrote into ``folder`` (a checkpoint is written across ranks)."""
    if world == 1:
        return
    mine = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    for files in gathered:
        for name, payload in files.items():
            path = folder / name
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(payload)


# ----------------------------------------------------------------------------------------------------------------
# The trial's record (probes.json)


def load_record(path: Path, loop_config: dict) -> dict:
    """The record a restored checkpoint holds, else an empty one."""
    if path.is_file():
        return json.loads(path.read_text())
    probes = loop_config["probes"]
    epochs = rebuild_config(loop_config["config"]).train.epochs
    empty = {key: {p: [] for p in probes} for key in METRIC_KEYS}
    return {"probes": list(probes), "pool": list(loop_config["pool"]), "epochs": epochs, "distractors": {}, **empty}


def add_to_record(record: dict, probe: str, report: dict) -> None:
    """Append one probe's epoch-end values; ``distractors``: the scored objects other than the probe itself."""
    for key in METRIC_KEYS:
        record[key][probe].append(float(report.get(key, math.nan)))
    scored = [i for i in report.get("val/scored", "").split(",") if i]
    record["distractors"][probe] = [i for i in scored if i != probe]


def epoch_report(record: dict, epoch: int) -> dict:
    """What Tune sees after ``epoch``: each metric's mean over probes, and ``val/pr_auc/<probe>`` per probe."""
    metrics: dict = {"epoch": epoch}
    for key in METRIC_KEYS:
        values = [record[key][p][epoch - 1] for p in record["probes"]]
        metrics[key] = sum(values) / len(values)
    metrics.update({f"val/pr_auc/{p}": record["val/pr_auc"][p][epoch - 1] for p in record["probes"]})
    return metrics


def is_complete(record: dict | None) -> bool:
    """Every probe trained and scored for every epoch."""
    return record is not None and all(len(v) >= record["epochs"] for v in record["val/pr_auc"].values())
