"""`personalize evaluate`: the pretrained encoder vs each instance's personalized encoder on the four tasks.

Reads OUT/ingest (images.parquet, instances.json) and the adapters OUT/train/<instance>/; commits OUT/evaluate/:

- ``metrics.json``: ``{"pretrained": {key: mean}, "personalized": {key: mean}, "per_instance": {id: {"pretrained":
  {...}, "personalized": {...}}}}`` with keys ``classification/pr_auc``, ``retrieval/{ndcg,mrr,top10}``,
  ``detection/{ap,ap50}``, ``segmentation/{ap,ap50}`` (the tasks in ``evaluate.tasks``). Means skip NaN.
  Instances without test images (a plain folder of a user's photos) are not measured: ``"skipped": {id:
  reason}`` and a one-line ``"note"`` say so, and with none left to measure the metrics are empty (no error).
  ``"per_split": {model: {split: {key: mean}}}`` holds the classification and retrieval keys measured on each
  test split alone (``in_distribution``, ``pose``, ``distractors``, ``pose_and_distractors``: the test images
  of that split, of every instance; NaN, skipped by the means, for an instance with none in it). It is absent
  when no test image has a split (Dogs / DF2 test images without annotations are ``in_distribution``).
- ``pr_curves.json``: ``{model: {instance: {"precision": [...], "recall": [...]}}}``.
- ``predictions.json``: ``{model: {instance: [{"image_id", "box", "score"}]}}`` (dense tasks).
- ``examples/*.png`` + ``mask_examples.json``: ``[{"caption", "image", "mask"}]`` for the report.
- ``<model>/<instance>/``: one committed unit per (model, instance), ``result.json`` + ``example_*.png``
  (``personalization/evaluation/outputs.py``), from which the files above are assembled.

The evaluated population, the test set and the dense images are defined in ``personalization/evaluation/
images.py``; the pretrained encoder is scored for every selected instance, the personalized encoder of X for X
only, over the same images. Work items are one encoder and the instances it is scored on (the pretrained one in
chunks of ``PRETRAINED_CHUNK`` instances, each personalized one alone), each run as two parts, the embedding
tasks and the dense tasks (``split_tasks``: they share no computation, and three encoders' six parts keep two
actors busy where three whole items leave one idle for the last), by one Ray Data actor pool
(:class:`EvaluateActor`, one item per actor at a time): an actor streams the rows it needs from the Parquet table,
computes the metrics there (``personalization/evaluation/measure.py``) and returns a compact JSON result per
instance (metrics, PR curve, boxes and scores, the report's example: one RLE mask and its image), never the image
table or dense masks. The driver merges the parts of each (model, instance) (``merge_results``) and commits it
when its last part arrives; a failure is kept to its instance (``OUT/evaluate/failures.json``; the summary files
list the others, with ``"failed"`` and no manifest), and a re-run redoes only the units that are missing or out
of date.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import ray

from personalization.artifacts import commit_stage, is_current, read_manifest
from personalization.config import ExperimentConfig, to_dict
from personalization.errors import MissingInputError, UserError
from personalization.evaluation.extract import FeatureExtractor
from personalization.evaluation.images import EvaluationImages, load_evaluation_images
from personalization.evaluation.measure import (
    DENSE_TASKS,
    EvaluationInputs,
    evaluate_encoder,
    merge_results,
    split_tasks,
)
from personalization.evaluation.outputs import (
    MODELS,
    add_to_metrics,
    commit_files,
    save_result,
    write_empty,
    write_summary,
)
from pipelines import common
from pipelines.common import InstanceFailures, ray_session, resolved, stage_dir, stage_main
from pipelines.instances import describe, without_failed, write_failures
from pipelines.resources import wants_gpu, without_placement

STAGE = "evaluate"
PRETRAINED_CHUNK = 16  # instances per pretrained work item: each item is one pass of the encoder over the images
METRICS_VERSION = 2  # in the units' and the summary's hash: 2 = per-split metrics (older results are redone)
log = logging.getLogger(f"personalize.{STAGE}")


class EvaluateActor:
    """Ray Data actor: a work item ``(model, adapter, instances, tasks)`` -> one row per instance, ``result`` (the
    JSON of :func:`~personalization.evaluation.measure.evaluate_encoder`'s result) or ``error`` (one line).

    An encoder is built on first use and the ``cache`` most recent are kept (pretrained chunks share one). A
    failing item (a broken adapter, an unreadable image) becomes error rows: the other items go on.
    """

    def __init__(self, model: dict, images_path: str, sets: EvaluationImages, settings: dict, cache: int = 2):
        self.model, self.images_path, self.sets, self.settings, self.cache = model, images_path, sets, settings, cache
        self._encoders: OrderedDict[str, FeatureExtractor] = OrderedDict()

    def encoder(self, adapter: str) -> FeatureExtractor:
        if adapter not in self._encoders:
            self._encoders[adapter] = FeatureExtractor(self.model, adapter, dense_size=self.settings["dense_size"])
            while len(self._encoders) > self.cache:
                self._encoders.popitem(last=False)
        self._encoders.move_to_end(adapter)
        return self._encoders[adapter]

    def evaluate(self, adapter: str, instances: list[str], tasks: list[str]) -> dict[str, dict]:
        reading = {k: self.settings[k] for k in ("batch_size", "min_object_pixels", "streamed")}
        inputs = EvaluationInputs(self.images_path, self.sets, instances, tasks, **reading)
        return evaluate_encoder(self.encoder(adapter), inputs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"model": [], "instance": [], "part": [], "result": [], "image": [], "error": []}
        items = zip(batch["model"], batch["adapter"], batch["instances"], batch["tasks"], batch["part"], strict=True)
        for model, adapter, instances, tasks, part in items:
            instances = json.loads(instances)
            try:
                found, error = self.evaluate(str(adapter), instances, json.loads(tasks)), ""
            except Exception as failure:  # noqa: BLE001 - kept to this item's instances, reported by the driver
                log.exception("evaluate: %s encoder of %s failed", model, instances)
                found, error = {}, describe(failure)
            for instance in instances:
                result = found.get(instance)
                example = (result or {}).get("example") or {}
                out["model"].append(str(model))
                out["instance"].append(instance)
                out["part"].append(int(part))
                out["image"].append(example.pop("image", b""))  # the example's PNG, as bytes beside the JSON
                out["result"].append(json.dumps(result) if result is not None else "")
                out["error"].append(error)
        return {key: np.array(values + [None], dtype=object)[:-1] for key, values in out.items()}


def work_items(
    todo: dict[str, list[str]], adapters: dict[str, Path], chunk: int = PRETRAINED_CHUNK
) -> list[dict[str, str]]:
    """The work of ``todo`` ({model: [instances]}): pretrained in chunks, each personalized encoder alone."""
    pretrained = todo.get("pretrained", [])
    items = [
        {"model": "pretrained", "adapter": "", "instances": json.dumps(pretrained[k : k + chunk])}
        for k in range(0, len(pretrained), chunk)
    ]
    items += [
        {"model": "personalized", "adapter": str(adapters[i]), "instances": json.dumps([i])}
        for i in todo.get("personalized", [])
    ]
    return items


def stream_results(
    cfg: ExperimentConfig, images_path: Path, sets: EvaluationImages, items: list[dict]
) -> Iterator[dict]:
    """Rows ``{model, instance, result (JSON), image (the example's PNG or b""), error}`` as the actors finish them
    (in no fixed order), each the merge of its parts (:func:`in_parts`)."""
    if not items:
        return
    settings = {
        "batch_size": cfg.evaluate.batch_size,
        "dense_size": cfg.evaluate.dense_image_size,
        "min_object_pixels": cfg.evaluate.min_object_pixels,
        "streamed": list(cfg.evaluate.tasks),
    }
    parts = in_parts(items, cfg.evaluate.tasks)
    dataset = ray.data.from_items(parts, override_num_blocks=len(parts))
    dataset = dataset.map_batches(
        EvaluateActor,
        fn_constructor_kwargs={"model": to_dict(cfg.model), "images_path": str(images_path), "sets": sets,
                               "settings": settings},
        # one item in flight per actor: an item queued behind a busy actor would wait while another sits idle
        compute=ray.data.ActorPoolStrategy(size=min(cfg.evaluate.num_actors, len(parts)),
                                           max_tasks_in_flight_per_actor=1),
        batch_size=1,
        batch_format="numpy",
        num_gpus=1.0 if wants_gpu(cfg, STAGE) else 0.0,
    )  # fmt: skip
    yield from merge_parts(dataset.iter_rows(), len(parts) // len(items))


def in_parts(items: list[dict], tasks: Sequence[str]) -> list[dict]:
    """Each work item once per part of ``tasks`` (:func:`split_tasks`), every item's first part before any second
    part (the larger parts first), with its ``tasks`` (JSON) and ``part`` (index)."""
    return [
        item | {"tasks": json.dumps(list(part)), "part": k}
        for k, part in enumerate(split_tasks(tasks))
        for item in items
    ]


def merge_parts(rows: Iterator[dict], count: int) -> Iterator[dict]:
    """The rows of each (model, instance) merged once its ``count`` parts have arrived: the first error, else the
    merged result and the example's image."""
    pending: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        key = (row["model"], row["instance"])
        pending.setdefault(key, []).append(row)
        if len(pending[key]) < count:
            continue
        parts = sorted(pending.pop(key), key=lambda r: r["part"])
        error = next((r["error"] for r in parts if r["error"]), "")
        results = [] if error else [json.loads(r["result"]) for r in parts]
        yield {
            "model": key[0],
            "instance": key[1],
            "result": json.dumps(merge_results(results)) if results else "",
            "image": next((r["image"] for r in parts if r["image"]), b""),
            "error": error,
        }


def unit_config(cfg: ExperimentConfig, model: str, instance: str) -> dict:
    return {"model": to_dict(cfg.model), "evaluate": without_placement(cfg.evaluate), "encoder": model,
            "instance": instance, "metrics": METRICS_VERSION}  # fmt: skip


def unit_inputs(ingest: Path, adapters: dict[str, Path], model: str, instance: str) -> dict[str, Path]:
    return {"ingest": ingest} | ({f"train/{instance}": adapters[instance]} if model == "personalized" else {})


def units_to_do(cfg: ExperimentConfig, instances: list[str], adapters: dict[str, Path]) -> dict[str, list[str]]:
    """{model: [instances]} whose ``OUT/evaluate/<model>/<instance>/`` is missing or out of date."""
    out, ingest = stage_dir(cfg, STAGE), stage_dir(cfg, "ingest")
    todo = {
        model: [i for i in instances if not is_current(out / model / i, STAGE, unit_config(cfg, model, i),
                                                        unit_inputs(ingest, adapters, model, i))]
        for model in MODELS
    }  # fmt: skip
    log.info(
        "evaluate: %d of %d unit(s) to evaluate (%s; pretrained in chunks of %d)", sum(map(len, todo.values())),
        len(MODELS) * len(instances), ", ".join(f"{m} {len(t)}" for m, t in todo.items()), PRETRAINED_CHUNK,
    )  # fmt: skip
    return todo


def evaluate_units(
    cfg: ExperimentConfig, sets: EvaluationImages, todo: dict[str, list[str]], adapters: dict[str, Path]
) -> dict[str, str]:
    """Commit ``OUT/evaluate/<model>/<instance>/`` for the units of ``todo`` as they arrive; {instance: error}."""
    out, ingest = stage_dir(cfg, STAGE), stage_dir(cfg, "ingest")
    failures: dict[str, str] = {}
    for row in stream_results(cfg, ingest / "images.parquet", sets, work_items(todo, adapters)):
        model, instance = row["model"], row["instance"]
        if row["error"]:
            failures[instance] = f"{model} encoder: {row['error']}"
            continue
        result = json.loads(row["result"])
        if result["example"] is not None:
            result["example"]["image"] = row["image"]
        commit_stage(
            out / model / instance, STAGE, unit_config(cfg, model, instance),
            lambda tmp, result=result: save_result(tmp, result),
            inputs=unit_inputs(ingest, adapters, model, instance), resolved_config=resolved(cfg),
        )  # fmt: skip
        log.info("evaluate: %s %s %s", model, instance, {k: round(v, 4) for k, v in result["metrics"].items()})
    return failures


def check_inputs(cfg: ExperimentConfig, images_path: Path, sets: EvaluationImages, evaluated: list[str]) -> None:
    """Detection and segmentation take each instance's reference from a masked train image: fail before Ray."""
    if any(t in DENSE_TASKS for t in cfg.evaluate.tasks):
        unmasked = sorted(i for i in evaluated if not sets.masked_train(i))
        if unmasked:
            raise UserError(
                f"{images_path}: instances {unmasked} have no masked train image, and detection/segmentation take "
                "the reference from the object's mask; add train_masks/<instance>/ and re-run `personalize ingest`, "
                "or drop detection and segmentation from evaluate.tasks"
            )


def run(cfg: ExperimentConfig) -> Path:
    ingest = stage_dir(cfg, "ingest")
    images_path, instances_path = ingest / "images.parquet", ingest / "instances.json"
    if not images_path.exists() or not instances_path.exists():
        raise MissingInputError(f"{ingest}: images.parquet / instances.json missing; run `personalize ingest` first")
    instances_info = common.load_instances(cfg)
    instances = without_failed(cfg, STAGE, common.select_instances(cfg, instances_info))
    adapters = {i: stage_dir(cfg, "train", i) for i in instances}
    missing = [
        i for i, path in adapters.items() if read_manifest(path) is None and not (path / "adapter_config.json").exists()
    ]
    if missing:
        raise MissingInputError(
            f"no personalized encoder for {missing} under {stage_dir(cfg, 'train')}; run `personalize train` first"
        )
    out = stage_dir(cfg, STAGE)
    config = {"model": to_dict(cfg.model), "evaluate": without_placement(cfg.evaluate), "instances": instances,
              "metrics": METRICS_VERSION}  # fmt: skip
    inputs = {"ingest": ingest, **{f"train/{i}": path for i, path in adapters.items()}}
    if is_current(out, STAGE, config, inputs):
        log.info("evaluate: up to date at %s, skipping", out)
        return out
    sets = load_evaluation_images(images_path, instances_info)
    have_test = sets.instances_with_test_images()
    skipped = {i: "no test images" for i in instances if i not in have_test}
    evaluated = [i for i in instances if i in have_test]
    if skipped:
        log.info("evaluate: %s", skip_note(skipped))
    check_inputs(cfg, images_path, sets, evaluated)
    failures, todo = {}, units_to_do(cfg, evaluated, adapters)
    if any(todo.values()):  # every unit committed already (or nothing to measure): no Ray needed
        with ray_session(cfg):
            failures = evaluate_units(cfg, sets, todo, adapters)
    write_failures(cfg, STAGE, failures, selected=instances)
    done = [i for i in evaluated if i not in failures]

    def make(tmp: Path) -> int:
        units = {model: {i: out / model / i for i in done} for model in MODELS}
        count = write_summary(tmp, units) if done else write_empty(tmp)
        if skipped:  # the instances without test images: listed, with the one-line note, beside the metrics
            add_to_metrics(tmp, skipped=skipped, note=skip_note(skipped))
        if failures:
            add_to_metrics(tmp, failed=failures)
        return count

    if failures:  # the summary of the others, without a manifest: the next run redoes the failed units only
        make(out)
        raise InstanceFailures(STAGE, failures, finished=len(done))
    return commit_files(out, STAGE, config, make, inputs=inputs, resolved_config=resolved(cfg))


def skip_note(skipped: dict[str, str]) -> str:
    return (
        f"Benchmark metrics skipped for {', '.join(sorted(skipped))}: no test images (every photo of a plain "
        "folder trains the encoder; a PODS-style test/ folder is what evaluate measures on)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    def run_and_note(cfg: ExperimentConfig) -> Path:
        out = run(cfg)
        note = json.loads((out / "metrics.json").read_text()).get("note")
        if note:
            print(f"{STAGE}: {note}")
        return out

    return stage_main(STAGE, run_and_note, argv)
