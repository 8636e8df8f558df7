"""`personalize run`: every stage for the selected instances, then ``summary.json`` and ``report.html``.

ingest -> [dreambooth -> generate] -> cutpaste -> train -> evaluate. Each stage commits its own output with a
manifest, so a re-run skips what is finished and redoes only what was interrupted or changed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from personalization.artifacts import write_json_atomic
from personalization.config import ExperimentConfig, save_config
from personalization.errors import UserError
from pipelines.common import InstanceFailures, check_before_start, ray_session, resolve_negatives, stage_main
from pipelines.instances import read_failures
from pipelines.report import build_report, current_job_id
from pipelines.stages import per_instance_before, run_plan

log = logging.getLogger("personalize.run")

METRIC_KEYS = (
    "classification/pr_auc",
    "retrieval/ndcg",
    "retrieval/mrr",
    "retrieval/top10",
    "detection/ap",
    "detection/ap50",
    "segmentation/ap",
    "segmentation/ap50",
)


def plan(cfg: ExperimentConfig) -> list[tuple[str, Callable[[ExperimentConfig], Path]]]:
    """The stages this config runs, in order, as (name, run) (the table is pipelines/stages.py)."""
    return [(stage.name, stage.runner()) for stage in run_plan(cfg)]


def run_stages(cfg: ExperimentConfig, stages: list[tuple[str, Callable]], label: str = "") -> dict[str, float]:
    """Run ``stages`` in order (an instance failure is recorded by the stage and the run goes on); their seconds."""
    timings = {}
    for index, (name, stage) in enumerate(stages, 1):
        step = f"{label}[{index}/{len(stages)}]"
        log.info("%s %s ...", step, name)
        print(f"{step} {name} ...", flush=True)
        started = time.time()
        try:
            stage(cfg)
        except InstanceFailures as error:  # the other instances committed; failures.json records this one
            print(f"{step} {error}", flush=True)
        timings[name] = round(time.time() - started, 1)
        print(f"{step} {name} done in {timings[name]:.1f} s", flush=True)
    return timings


def run(cfg: ExperimentConfig) -> Path:
    check_before_start(cfg)
    if cfg.run.seeds:  # train + evaluate once per seed over shared data stages (pipelines/seeds.py)
        from pipelines.seeds import run_seeds  # here: pipelines.seeds imports this module

        return run_seeds(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stages = plan(cfg)
    with ray_session(cfg):
        timings = run_stages(cfg, stages)
    summary = write_summary(cfg, timings)
    report = build_report(cfg, summary)
    print_table(summary)
    print(f"summary: {out / 'summary.json'}\nreport:  {report}")
    if summary["failed"]:
        # Exit non-zero (1) so a job or a script notices; everything that finished is committed and reported.
        failed = {i: f"{f['stage']}: {f['error']}" for i, f in summary["failed"].items()}
        raise InstanceFailures("run", failed, finished=len(summary["instances"]), listed_in=str(out / "summary.json"))
    return out


def write_summary(cfg: ExperimentConfig, timings: dict[str, float]) -> dict:
    """``OUT/summary.json``: the instances (trained; evaluated or skipped), failures, metrics and stage times.

    An instance with no test images is trained but not evaluated: it is listed under ``skipped`` and ``note``
    says so (the metrics are then empty for it). ``derived_masks`` lists photos whose mask ingest derived.
    ``per_split`` (when evaluate measured test splits) is ``metrics.json``'s: {model: {split: {key: mean}}}."""
    out = Path(cfg.output_dir)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    skipped = metrics.get("skipped", {})
    summary = {
        "instances": sorted({*metrics["per_instance"], *skipped}),
        "failed": read_failures(cfg, per_instance_before(cfg, "report")),
        "backbone": cfg.model.backbone,
        "negatives": _negatives_used(cfg),
        "metrics": {"pretrained": metrics["pretrained"], "personalized": metrics["personalized"]},
        "per_instance": metrics["per_instance"],
        **({"per_split": metrics["per_split"]} if "per_split" in metrics else {}),
        "skipped": skipped,
        "seconds": timings,
        "config": "config.yaml",
    }
    if metrics.get("note"):
        summary["note"] = metrics["note"]
    derived = out / "ingest" / "derived_masks.json"
    if derived.is_file():
        summary["derived_masks"] = json.loads(derived.read_text())
    if job := current_job_id():
        summary["job_id"] = job
    write_json_atomic(Path(cfg.output_dir) / "summary.json", summary)
    return summary


def _negatives_used(cfg: ExperimentConfig) -> str:
    try:
        return resolve_negatives(cfg).train.negatives
    except UserError:  # reported when train ran; the summary still gets written
        return cfg.train.negatives


def print_table(summary: dict) -> None:
    if summary.get("note"):
        print(f"\n{summary['note']}")
    pretrained, personalized = summary["metrics"]["pretrained"], summary["metrics"]["personalized"]
    if not pretrained:
        return
    print(f"\n{'metric':<24}{'pretrained':>12}{'personalized':>14}")
    for key in METRIC_KEYS:
        if key in pretrained:
            print(f"{key:<24}{pretrained[key]:>12.3f}{personalized[key]:>14.3f}")
    print()


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("run", run, argv)
