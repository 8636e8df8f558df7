"""One `personalize sweep` trial: every probe object trained and scored, epoch by epoch, one value for Tune.

A trial trains its probes **sequentially and interleaved by epoch**: for epoch e = 1..E, each probe in turn runs
``pipelines.train`` with ``train.epochs=e``, which resumes that probe's Ray Train run from its checkpoint of
epoch e-1 (train keeps one run per instance and config, epochs excluded, and an extended run takes the same
random draws as an uninterrupted one). After the last probe of epoch e the trial calls ``tune.report`` once with
the mean over probes, so ASHA compares trials after every epoch and a stopped trial trains no further. One
TorchTrainer runs at a time (no extra CPUs); each probe costs one trainer start per epoch.

Per probe, rank 0 adds ``val/pr_auc`` (:class:`ValidationProbe` over the probes' photos only, so the pool never
serves as a distractor) to train's report; a Ray Train callback on the controller forwards the report to the
trial through a Ray queue. Negatives: the trial's ``ingest`` links to the sweep's probe view of the ingest
stage (``instances.json`` with the probes hidden from the val split), so ``train.negatives=val`` draws from the
pool only. The trial writes ``trials/<id>/probes.json`` (probes, pool, each probe's distractors and per-epoch
``val/pr_auc`` and ``train/loss``); a restarted trial re-reports the epochs recorded there without training.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ray.tune
import ray.util
import torch
from ray.util.queue import Queue

from personalization.artifacts import hash_config, write_json_atomic
from personalization.config import ExperimentConfig, build_config, replace, to_dict
from personalization.errors import MissingInputError
from personalization.evaluation.probe import ValidationProbe
from personalization.sweeps import nest
from pipelines.stages import BY_NAME

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


def run_trial(params: dict, *, base: dict, probes: list[str], pool: list[str]) -> None:
    """One Tune trial: the base config plus ``params`` (dotted keys), every probe trained on the shared outputs."""
    train = BY_NAME["train"].runner()
    base_cfg = build_config(base)
    cfg = build_config(base, nest(params))
    out = Path(base_cfg.output_dir).parent / "trials" / ray.tune.get_context().get_trial_id()
    link_upstream(out, trial_links(cfg, base_cfg, params))
    cfg = replace(cfg, output_dir=str(out))
    images = str(Path(base_cfg.output_dir) / "ingest" / "images.parquet")
    record = load_record(out, probes, pool, cfg.train.epochs)
    reports = Queue(actor_options={"num_cpus": 0})
    for epoch in range(1, cfg.train.epochs + 1):
        for probe in probes:
            if len(record["val/pr_auc"][probe]) >= epoch:
                continue  # a restarted trial: this epoch was trained and recorded before
            scorer = ValidationProbe(images, probe, to_dict(cfg.model), instances=probes)
            probe_cfg = replace(cfg, **{"data.instances": (probe,), "train.epochs": epoch})
            train(probe_cfg, callbacks=[forward_reports(reports)], report_extra=TrialReport(scorer))
            add_to_record(record, probe, _last_report(reports, probe, epoch, out))
            write_json_atomic(out / RECORD, record)
        ray.tune.report(epoch_report(record, epoch))
    reports.shutdown()


def _last_report(reports, probe: str, epoch: int, out: Path) -> dict:
    received = reports.get_nowait_batch(reports.qsize())
    if not received:
        raise RuntimeError(
            f"sweep trial {out.name}: training {probe} to epoch {epoch} reported nothing (already committed in "
            f"{out / 'train' / probe} but not in {out / RECORD}?); remove {out} and resume the sweep"
        )
    return received[-1]


def load_record(out: Path, probes: list[str], pool: list[str], epochs: int) -> dict:
    """``out/probes.json`` if this trial wrote one before, else an empty record."""
    path = out / RECORD
    if path.is_file():
        return json.loads(path.read_text())
    empty = {key: {p: [] for p in probes} for key in METRIC_KEYS}
    return {"probes": list(probes), "pool": list(pool), "epochs": epochs, "distractors": {}, **empty}


def add_to_record(record: dict, probe: str, report: dict) -> None:
    """Append one probe's epoch-end values; ``distractors``: the scored objects other than the probe itself."""
    for key in METRIC_KEYS:
        record[key][probe].append(float(report.get(key, math.nan)))
    scored = [i for i in report.get("val/scored", "").split(",") if i]
    record["distractors"][probe] = [i for i in scored if i != probe]
    record["placement_group"] = report.get("placement_group", "")


def epoch_report(record: dict, epoch: int) -> dict:
    """What Tune sees after ``epoch``: each metric's mean over probes, and ``val/pr_auc/<probe>`` per probe."""
    metrics: dict = {"epoch": epoch, "placement_group": record.get("placement_group", "")}
    for key in METRIC_KEYS:
        values = [record[key][p][epoch - 1] for p in record["probes"]]
        metrics[key] = sum(values) / len(values)
    metrics.update({f"val/pr_auc/{p}": record["val/pr_auc"][p][epoch - 1] for p in record["probes"]})
    return metrics


def is_complete(record: dict | None) -> bool:
    """Every probe trained and scored for every epoch."""
    return record is not None and all(len(v) >= record["epochs"] for v in record["val/pr_auc"].values())


class TrialReport:
    """Rank 0's extra metrics: the validation probe's ``val/pr_auc``, the objects it scored (``val/scored``,
    comma-separated), and the worker group's placement group, so the driver can release it if Tune kills the
    trial (see ``pipelines.sweep``'s ReleasePlacementGroups)."""

    def __init__(self, probe: ValidationProbe):
        self.probe = probe

    def __call__(self, model: torch.nn.Module) -> dict:
        metrics = self.probe(model)
        group = ray.util.get_current_placement_group()
        scored = ",".join(self.probe.scored_instances)
        return {**metrics, "val/scored": scored, "placement_group": group.id.hex() if group is not None else ""}


def forward_reports(queue):
    """A Ray Train ``UserCallback`` (it runs on the Train controller) that puts rank 0's metrics of every report
    on ``queue``."""
    from ray.train import UserCallback  # ~1 s to import: only a trial needs it, not the sweep driver

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put(dict(metrics[0]))

    return ForwardReports()
