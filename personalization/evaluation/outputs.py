"""What `evaluate` writes: one folder per (model, instance) result, and the summary files assembled from them.

``OUT/evaluate/<model>/<instance>/`` (model = ``pretrained`` or ``personalized``) holds ``result.json``
(``metrics``, ``curve``, ``predictions``, ``example``) and the example prediction's mask and image
(``example_mask.png``, ``example_image.png``, when there is one); each folder is committed on its own, with its
own manifest.

The summary files at the top of ``OUT/evaluate/`` (formats in ``pipelines/evaluate.py``'s docstring):
``metrics.json``, ``pr_curves.json``, ``predictions.json``, ``mask_examples.json`` and ``examples/*.png``.
:func:`write_summary` builds them from the committed results, one result file at a time; :func:`commit_files`
commits them beside the per-instance folders (which ``commit_stage`` would replace), manifest last.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from personalization import schema
from personalization.artifacts import MANIFEST, RESOLVED_CONFIG, build_then_commit, stage_hash

MODELS = ("pretrained", "personalized")
RESULT = "result.json"
EXAMPLE_MASK, EXAMPLE_IMAGE = "example_mask.png", "example_image.png"
EXAMPLES_PER_MODEL = 4  # predicted masks saved for the report, per model
SUMMARY_FILES = ("metrics.json", "pr_curves.json", "predictions.json", "mask_examples.json", "examples")


def decode_rle(rle: Mapping) -> np.ndarray:
    """COCO RLE (``counts`` as str or bytes) -> (H, W) bool mask."""
    counts = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def save_result(folder: Path, result: Mapping) -> int:
    """One (model, instance) result into ``folder``: ``result.json`` and the example's mask as PNG."""
    example = result.get("example")
    if example is not None:
        (folder / EXAMPLE_MASK).write_bytes(schema.encode_mask(decode_rle(example["rle"])))
        (folder / EXAMPLE_IMAGE).write_bytes(example["image"])
        example = {"image_id": example["image_id"], "score": example["score"], "mask": EXAMPLE_MASK,
                   "image": EXAMPLE_IMAGE}  # fmt: skip
    (folder / RESULT).write_text(json.dumps({**result, "example": example}))
    return len(result["predictions"])


def load_result(folder: Path) -> dict:
    return json.loads((folder / RESULT).read_text())


def mean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def write_summary(out: Path, results: Mapping[str, Mapping[str, Path]]) -> int:
    """The summary files of ``results`` ({model: {instance: committed result folder}}, same instances for both
    models, in evaluation order) into ``out``."""
    instances = list(results[MODELS[0]])
    per_instance: dict[str, dict] = {i: {} for i in instances}
    splits: dict[str, dict] = {i: {} for i in instances}
    curves: dict[str, dict] = {model: {} for model in MODELS}
    predictions: dict[str, dict] = {model: {} for model in MODELS}
    examples: dict[str, list] = {model: [] for model in MODELS}
    shown = set(sorted(instances)[:EXAMPLES_PER_MODEL])
    for model in MODELS:
        for instance in instances:
            result = load_result(results[model][instance])
            per_instance[instance][model] = result["metrics"]
            splits[instance][model] = result.get("split_metrics") or {}  # units committed before splits: none
            if result["curve"] is not None:
                curves[model][instance] = result["curve"]
            predictions[model][instance] = result["predictions"]
            if instance in shown and result["example"] is not None:
                examples[model].append((instance, results[model][instance], result["example"]))
    keys = {model: list(per_instance[instances[0]][model]) for model in MODELS}
    summary = {
        model: {k: mean([per_instance[i][model][k] for i in instances]) for k in keys[model]} for model in MODELS
    }
    summary["per_instance"] = per_instance
    if per_split := mean_per_split(splits, instances):
        summary["per_split"] = per_split
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "pr_curves.json").write_text(json.dumps(curves))
    (out / "predictions.json").write_text(json.dumps(predictions, indent=1))
    (out / "mask_examples.json").write_text(json.dumps(save_examples(out, examples), indent=2))
    return len(instances)


def mean_per_split(splits: Mapping[str, Mapping[str, Mapping]], instances: Sequence[str]) -> dict:
    """``{model: {split: {key: mean over instances}}}`` from ``{instance: {model: {split: {key: value}}}}``
    (NaN skipped, as for the pooled means); empty when no instance has split metrics."""
    summary: dict[str, dict] = {}
    for model in MODELS:
        names = list(dict.fromkeys(s for i in instances for s in splits[i].get(model, {})))
        for split in names:
            found = [splits[i][model][split] for i in instances if split in splits[i].get(model, {})]
            keys = list(dict.fromkeys(k for metrics in found for k in metrics))
            summary.setdefault(model, {})[split] = {k: mean([m.get(k, math.nan) for m in found]) for k in keys}
    return summary


def save_examples(out: Path, examples: Mapping[str, list]) -> list[dict]:
    """``examples/<model>_<instance>_<image>_{image,mask}.png`` and their captions, sorted by instance per model."""
    chosen = [(model, *entry) for model in MODELS for entry in sorted(examples[model], key=lambda e: e[0])]
    listed = []
    for model, instance, folder, example in chosen:
        stem = f"{model}_{instance}_{example['image_id']}"
        (out / "examples").mkdir(exist_ok=True)
        shutil.copyfile(folder / example["image"], out / "examples" / f"{stem}_image.png")
        shutil.copyfile(folder / example["mask"], out / "examples" / f"{stem}_mask.png")
        listed.append(
            {
                "caption": f"{model} / {instance} (score {example['score']:.3f})",
                "image": f"examples/{stem}_image.png",
                "mask": f"examples/{stem}_mask.png",
            }
        )
    return listed


def write_empty(out: Path) -> int:
    """The outputs of an evaluation with no instance to measure: empty metrics, curves and examples."""
    (out / "metrics.json").write_text(json.dumps({"pretrained": {}, "personalized": {}, "per_instance": {}}))
    (out / "pr_curves.json").write_text(json.dumps({"pretrained": {}, "personalized": {}}))
    (out / "predictions.json").write_text(json.dumps({"pretrained": {}, "personalized": {}}))
    (out / "mask_examples.json").write_text("[]")
    return 0


def add_to_metrics(out: Path, **entries: Any) -> None:
    """Add top-level entries (``skipped``, ``note``, ``failed``) to ``out/metrics.json``."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.update(entries)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def commit_files(
    final_dir: Path,
    stage: str,
    config: Any,
    build: Callable[[Path], int | None],
    *,
    inputs: Mapping[str, str | Path] = {},
    resolved_config: Mapping | None = None,
) -> Path:
    """Like ``artifacts.commit_stage`` (the same ``build_then_commit`` shape) for the summary files of a folder
    that also holds committed sub-folders.

    The old manifest goes first, ``build(tmp)`` writes into a temporary sibling, each file replaces its old copy
    by rename, and the manifest (same fields as ``commit_stage``'s) is written last: a crash in between leaves a
    folder without a top manifest, which the next run rebuilds, keeping the committed sub-folders.
    """
    key, config_hash, input_hashes = stage_hash(stage, config, inputs)
    final_dir.mkdir(parents=True, exist_ok=True)
    (final_dir / MANIFEST).unlink(missing_ok=True)
    for leftover in final_dir.parent.glob(f".{final_dir.name}.summary-*"):  # a crashed summary's scratch
        shutil.rmtree(leftover, ignore_errors=True)

    def install(tmp: Path) -> None:
        for name in SUMMARY_FILES:
            target = final_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            if (tmp / name).exists():
                os.replace(tmp / name, target)
            else:
                target.unlink(missing_ok=True)
        if (tmp / RESOLVED_CONFIG).exists():
            os.replace(tmp / RESOLVED_CONFIG, final_dir / RESOLVED_CONFIG)

    header = {"stage": stage, "hash": key, "config_hash": config_hash, "inputs": input_hashes}
    build_then_commit(final_dir, "summary", build, install, header, resolved_config=resolved_config)
    return final_dir
