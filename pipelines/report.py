"""``OUT/report.html`` from what the stages committed: metrics, training loss, PR curves, samples, masks."""

from __future__ import annotations

import json
import os
from pathlib import Path

from personalization import schema
from personalization.config import ExperimentConfig
from personalization.evaluation.report import load_evaluation_outputs, write_report

SAMPLES_PER_SOURCE = 8


def _loss_history(out: Path, instances: list[str]) -> dict[str, list[float]]:
    history = {}
    for instance in instances:
        path = out / "train" / instance / "metrics.json"
        if path.is_file():
            history[instance] = json.loads(path.read_text()).get("loss", [])
    return history


def _samples(out: Path, instances: list[str]) -> list[tuple[str, bytes]]:
    """A few synthetic images per source (Cut-and-Paste composites, generated positives and negatives).

    Shards are read a batch at a time and reading stops once enough samples are found: a stage folder can hold
    tens of gigabytes of PNGs at real scale.
    """
    samples = []
    columns = ["instance_id", "role", "source", "image", "score"]
    for folder in (out / "cutpaste", out / "generate" / "positives", out / "generate" / "negatives"):
        found = []
        for batch in schema.iter_image_batches(folder, columns=columns) if folder.is_dir() else []:
            found += [r for r in batch.to_pylist() if r["instance_id"] in instances or r["role"] == "negative"]
            if len(found) >= SAMPLES_PER_SOURCE:
                break
        for row in found[:SAMPLES_PER_SOURCE]:
            score = "" if row["score"] is None else f", score {row['score']:.2f}"
            samples.append((f"{row['source']} {row['role']}: {row['instance_id']}{score}", row["image"]))
    return samples


def _derived_masks(out: Path) -> list[tuple[str, bytes, bytes]]:
    """(caption, photo, mask) of each mask ingest derived (``OUT/ingest/derived_masks.json``), in that order."""
    listing = out / "ingest" / "derived_masks.json"
    if not listing.is_file():
        return []
    records = json.loads(listing.read_text())
    ids = [r["image_id"] for r in records]
    columns = ["image_id", "image", "mask"]
    table = schema.read_image_table(out / "ingest" / "images.parquet", columns=columns, image_id=ids)
    found = {r["image_id"]: (r["image"], r["mask"]) for r in table.to_pylist()}
    shown = []
    for record in records:
        if record["image_id"] in found:
            how = "FAILED, box used" if record["fallback"] else f"GrabCut from {record['box_from']} box"
            shown.append((f"{record['file']} ({how})", *found[record["image_id"]]))
    return shown


def current_job_id() -> str | None:
    """The Ray Job id when this driver runs as a submitted job (``ray job submit`` / ``personalize --address``)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except json.JSONDecodeError:
        return None


def build_report(cfg: ExperimentConfig, summary: dict) -> Path:
    out = Path(cfg.output_dir)
    notes = [f"backbone {cfg.model.backbone}; {len(summary['instances'])} instances; output {out.resolve()}"]
    if job := current_job_id():
        notes.append(f"Ray Job {job}")
    for instance, failure in sorted(summary.get("failed", {}).items()):
        notes.append(f"FAILED {instance} in {failure['stage']} (left out of the metrics): {failure['error']}")
    if summary.get("note"):
        notes.append(summary["note"])
    if summary.get("negatives") == "stock":
        notes.append(
            "Negatives: stock photos (generic real photos shipped with scikit-image), easy negatives; photos of "
            "other objects of the category (train.negatives_dir=DIR) teach finer distinctions."
        )
    if derived := summary.get("derived_masks"):
        notes.append(f"{len(derived)} photo(s) had no mask: GrabCut derived one (shown below; check them).")
    if cfg.generate.enabled and "zoo" in (cfg.dreambooth.base_model + cfg.generate.prompts_file):
        notes.append("Generated images come from the tiny random zoo models: they are noise, by design.")
    return write_report(
        out / "report.html",
        {"name": cfg.name, **summary["metrics"], "per_instance": summary["per_instance"]}
        | ({"per_split": summary["per_split"]} if "per_split" in summary else {}),
        loss_history=_loss_history(out, summary["instances"]),
        sample_images=_samples(out, summary["instances"]),
        derived_masks=_derived_masks(out),
        notes=notes,
        **load_evaluation_outputs(out / "evaluate"),
    )
