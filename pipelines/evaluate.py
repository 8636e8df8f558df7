"""`personalize evaluate`: the pretrained encoder vs each instance's personalized encoder on the four tasks.

Reads OUT/ingest (images.parquet, instances.json) and the adapters OUT/train/<instance>/; commits OUT/evaluate/:

- ``metrics.json``: ``{"pretrained": {key: mean}, "personalized": {key: mean}, "per_instance": {id: {"pretrained":
  {...}, "personalized": {...}}}}`` with keys ``classification/pr_auc``, ``retrieval/{ndcg,mrr,top10}``,
  ``detection/{ap,ap50}``, ``segmentation/{ap,ap50}`` (the tasks in ``evaluate.tasks``). Means skip NaN.
  Instances without test images (a plain folder of a user's photos) are not measured: ``"skipped": {id:
  reason}`` and a one-line ``"note"`` say so, and with none left to measure the metrics are empty (no error).
- ``pr_curves.json``: ``{model: {instance: {"precision": [...], "recall": [...]}}}``.
- ``predictions.json``: ``{model: {instance: [{"image_id", "box", "score"}]}}`` (dense tasks).
- ``examples/*.png`` + ``mask_examples.json``: ``[{"caption", "image", "mask"}]`` for the report.

The evaluated population is every non-val instance (test and user splits): its test images are the test set
(other instances are the negatives) and its train images the retrieval gallery. The pretrained encoder is scored
for every selected instance; the personalized encoder of X for X only, over the same images. Features come from
one Ray Data pass through one actor pool serving every encoder (:class:`EmbedActor` around the library's
``FeatureExtractor``: per encoder, embeddings and dense predictions); metrics are numpy on the driver. Dense
evaluation images are the ``test_dense`` split when present, else the test images with masks.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from personalization import schema
from personalization.artifacts import commit_stage, read_manifest
from personalization.config import ExperimentConfig, to_dict
from personalization.errors import MissingInputError, UserError
from personalization.evaluation.classification import compute_pr_curve, evaluate_classification
from personalization.evaluation.coco import evaluate_coco
from personalization.evaluation.dense import DensePrediction
from personalization.evaluation.extract import FeatureExtractor
from personalization.evaluation.retrieval import evaluate_retrieval
from pipelines import common
from pipelines.common import ray_session, resolved, stage_dir, stage_main
from pipelines.instances import without_failed
from pipelines.resources import wants_gpu, without_placement

STAGE = "evaluate"
DENSE_TASKS = ("detection", "segmentation")
EXAMPLES_PER_MODEL = 4  # predicted masks saved for the report, per model
log = logging.getLogger(f"personalize.{STAGE}")


class EmbedActor:
    """Ray Data actor serving *every* encoder of the run from one pool (one start-up, not three per encoder).

    Each input row is ``(encoder, task, row)``: ``encoder`` an adapter folder ("" = pretrained), ``task`` "embed"
    or "predict", ``row`` an index into ``images`` (image_id, image, height, width, mask, instance_id; an Arrow
    table or its object ref, shared by all rows so image bytes are stored once). An encoder's
    ``FeatureExtractor`` is built on first use (the ``cache`` most recent are kept; rows arrive grouped by
    encoder) together with its dense templates: for each instance in ``owners[encoder]``, the reference of its
    first masked train image (``template_rows[instance][0]``, ingest order) and the box means of all of them.
    Output rows: ``encoder, task, image_id, instance_id, embedding`` (float32 bytes, embed rows), ``mask`` (PNG),
    ``box`` (4 float64 bytes, xywh) and ``score`` (predict rows: one per non-empty prediction per template).
    """

    def __init__(
        self,
        model: dict,
        images,
        template_rows: dict[str, list[int]],
        owners: dict[str, list[str]],
        dense_size: int,
        min_object_pixels: int = 100,
        cache: int = 2,
    ):
        import ray

        self.images = ray.get(images) if isinstance(images, ray.ObjectRef) else images
        self.model, self.dense_size, self.min_object_pixels = model, dense_size, min_object_pixels
        self.template_rows, self.owners, self.cache = template_rows, owners, cache
        self._encoders: OrderedDict[str, tuple[FeatureExtractor, dict]] = OrderedDict()

    def _column(self, name: str, rows: Sequence[int]) -> list:
        return self.images[name].take(pa.array(rows, pa.int64())).to_pylist()

    def encoder(self, adapter: str) -> tuple[FeatureExtractor, dict]:
        """The extractor of ``adapter`` and its templates {instance: (reference, box means)}, built once."""
        if adapter in self._encoders:
            self._encoders.move_to_end(adapter)
            return self._encoders[adapter]
        extractor = FeatureExtractor(self.model, adapter, dense_size=self.dense_size)
        templates = {}
        for instance in self.owners.get(adapter, []):
            rows = self.template_rows[instance]
            references, box_means = extractor.templates(self._column("image", rows), self._column("mask", rows))
            # float64, as the templates were when they travelled as JSON lists: predictions stay identical.
            templates[instance] = (references[0].astype(np.float64), box_means.astype(np.float64))
        self._encoders[adapter] = (extractor, templates)
        while len(self._encoders) > self.cache:
            self._encoders.popitem(last=False)
        return extractor, templates

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("encoder", "task", "image_id", "instance_id", "embedding", "mask")}
        out |= {"box": [], "score": []}
        groups: dict[tuple[str, str], list[int]] = {}
        for encoder, task, row in zip(batch["encoder"], batch["task"], batch["row"], strict=True):
            groups.setdefault((str(encoder), str(task)), []).append(int(row))
        for (adapter, task), rows in groups.items():
            extractor, templates = self.encoder(adapter)
            images, ids = self._column("image", rows), self._column("image_id", rows)
            if task == "embed":
                found = {"image_id": ids, "embedding": [e.tobytes() for e in extractor.embed(images)]}
            else:
                hw = list(zip(self._column("height", rows), self._column("width", rows), strict=True))
                found = extractor.predict(images, ids, hw, templates, self.min_object_pixels)
                found["box"] = [np.asarray(b, np.float64).tobytes() for b in found["box"]]
            n = len(found["image_id"])
            out["encoder"] += [adapter] * n
            out["task"] += [task] * n
            out["image_id"] += list(found["image_id"])
            for key, empty in (("instance_id", ""), ("embedding", b""), ("mask", b""), ("box", b"")):
                out[key] += list(found.get(key, [empty] * n))
            out["score"] += list(found.get("score", [math.nan] * n))
        return {k: np.array(v + [None], dtype=object)[:-1] if k != "score" else np.asarray(v, np.float64)
                for k, v in out.items()}  # fmt: skip


def compute_features(
    cfg: ExperimentConfig, tables: dict[str, pa.Table], owners: dict[str, list[str]], actor: type = EmbedActor
) -> dict[str, dict]:
    """One Ray Data pass, one actor pool, for every encoder in ``owners`` ({adapter ("" = pretrained):
    [instances it is scored on]}). Returns {adapter: {"embeddings": {image_id: (D,)}, "predictions": [row]}}."""
    import ray

    tasks = cfg.evaluate.tasks
    instances = sorted({i for owned in owners.values() for i in owned})
    masked = tables["train"].filter(pc.is_valid(tables["train"]["mask"]))
    masked = masked.filter(pc.is_in(masked["instance_id"], pa.array(instances)))
    parts = {"embed": pa.concat_tables([tables["train"], tables["test"]]), "predict": tables["dense"],
             "templates": masked}  # fmt: skip
    columns = ["image_id", "image", "height", "width", "mask", "instance_id"]
    images = pa.concat_tables([parts[k].select(columns) for k in ("embed", "predict", "templates")])
    offsets = {"embed": 0, "predict": parts["embed"].num_rows}
    offsets["templates"] = offsets["predict"] + parts["predict"].num_rows
    template_rows: dict[str, list[int]] = {}
    for k, instance in enumerate(masked["instance_id"].to_pylist()):  # ingest order: the first is the reference
        template_rows.setdefault(instance, []).append(offsets["templates"] + k)
    wanted = [t for t in ("embed", "predict") if t == "embed" and {"classification", "retrieval"} & set(tasks)
              or t == "predict" and set(DENSE_TASKS) & set(tasks)]  # fmt: skip
    work = [
        {"encoder": adapter, "task": task, "row": offsets[task] + k}
        for adapter in owners
        for task in wanted
        for k in range(parts[task].num_rows)
    ]
    result = {adapter: {"embeddings": {}, "predictions": []} for adapter in owners}
    if not work:
        return result
    batch = cfg.evaluate.batch_size
    gpus = 1.0 if wants_gpu(cfg, STAGE) else 0.0
    dataset = ray.data.from_items(work, override_num_blocks=max(1, math.ceil(len(work) / batch)))
    dataset = dataset.map_batches(
        actor,
        fn_constructor_kwargs={
            "model": to_dict(cfg.model),
            "images": ray.put(images),
            "template_rows": template_rows,
            "owners": owners,
            "dense_size": cfg.evaluate.dense_image_size,
            "min_object_pixels": cfg.evaluate.min_object_pixels,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.evaluate.num_actors),
        batch_size=batch,
        batch_format="numpy",
        num_gpus=gpus,
    )
    for row in dataset.iter_rows():
        found = result[row["encoder"]]
        if row["task"] == "embed":
            found["embeddings"][row["image_id"]] = np.frombuffer(row["embedding"], np.float32)
        else:
            found["predictions"].append(row)
    return result


def _load_tables(images_path: Path, instances: dict[str, dict]) -> dict[str, pa.Table]:
    """The real image rows split by use: gallery (train), test (classification/retrieval), dense (detection)."""
    population = sorted(i for i, info in instances.items() if info["split"] != "val")
    table = schema.read_image_table(images_path, role=["real_train", "real_test"], instance_id=population)
    train = table.filter(pc.equal(table["role"], "real_train"))
    test_all = table.filter(pc.equal(table["role"], "real_test"))
    is_dense = pc.equal(test_all["split"], "test_dense")
    test = test_all.filter(pc.invert(is_dense))
    if test.num_rows == 0:
        test = test_all  # only densely annotated test images: use them for every task
    dense = test_all.filter(is_dense)
    if dense.num_rows == 0:
        dense = test_all.filter(pc.is_valid(test_all["mask"]))
    return {"train": train, "test": test, "dense": dense}


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _rows_of(table: pa.Table, instance: str) -> pa.Table:
    return table.filter(pc.equal(table["instance_id"], instance))


def evaluate_encoder(
    cfg: ExperimentConfig, tables: dict[str, pa.Table], features: dict, instances: list[str]
) -> tuple[dict[str, dict], dict[str, tuple], dict[str, list]]:
    """Metrics per instance of one encoder from its ``features`` (see :func:`compute_features`), its PR curves,
    and its dense predictions (image_id, mask, box, score)."""
    tasks = cfg.evaluate.tasks
    metrics: dict[str, dict] = {i: {} for i in instances}
    curves: dict[str, tuple] = {}
    if "classification" in tasks or "retrieval" in tasks:
        train, test = tables["train"], tables["test"]
        embeddings = features["embeddings"]
        train_x = np.stack([embeddings[i] for i in train["image_id"].to_pylist()])
        test_x = np.stack([embeddings[i] for i in test["image_id"].to_pylist()])
        train_y = np.array(train["instance_id"].to_pylist())
        test_y = np.array(test["instance_id"].to_pylist())
        for instance in instances:
            if "classification" in tasks:
                result = evaluate_classification(train_x, train_y, test_x, test_y, instance)
                metrics[instance]["classification/pr_auc"] = result["pr_auc"]
                curves[instance] = compute_pr_curve(train_x, train_y, test_x, test_y, instance)
            if "retrieval" in tasks:
                for name, value in evaluate_retrieval(train_x, train_y, test_x, test_y, instance).items():
                    metrics[instance][f"retrieval/{name}"] = value
    predictions: dict[str, list] = {i: [] for i in instances}
    dense_tasks = [t for t in tasks if t in DENSE_TASKS]
    if dense_tasks:
        for row in features["predictions"]:
            predictions[row["instance_id"]].append(
                DensePrediction(
                    image_id=row["image_id"],
                    mask=schema.decode_mask(row["mask"]),
                    box=tuple(float(v) for v in np.frombuffer(row["box"], np.float64)),
                    score=float(row["score"]),
                )
            )
        dense = tables["dense"]
        images = dict(
            zip(
                dense["image_id"].to_pylist(),
                zip(dense["height"].to_pylist(), dense["width"].to_pylist(), strict=True),
                strict=True,
            )
        )
        for instance in instances:
            own = _rows_of(dense, instance).filter(pc.is_valid(_rows_of(dense, instance)["mask"]))
            gt = {
                i: schema.decode_mask(m)
                for i, m in zip(own["image_id"].to_pylist(), own["mask"].to_pylist(), strict=True)
            }
            # NaN when the instance has no annotated dense image (documented in evaluation/coco.py).
            metrics[instance].update(evaluate_coco(images, gt, predictions[instance], tasks=dense_tasks))
    return metrics, curves, predictions


def _save_examples(out: Path, model: str, predictions: dict[str, list], dense: pa.Table) -> list[dict]:
    """The highest-scoring prediction on each instance's own image (up to EXAMPLES_PER_MODEL) as PNG files."""
    owner = dict(zip(dense["image_id"].to_pylist(), dense["instance_id"].to_pylist(), strict=True))
    image_of = dict(zip(dense["image_id"].to_pylist(), dense["image"].to_pylist(), strict=True))
    examples = []
    for instance in sorted(predictions)[:EXAMPLES_PER_MODEL]:
        own = [p for p in predictions[instance] if owner.get(p.image_id) == instance]
        if not own:
            continue
        best = max(own, key=lambda p: p.score)
        stem = f"{model}_{instance}_{best.image_id}"
        (out / "examples").mkdir(exist_ok=True)
        (out / "examples" / f"{stem}_image.png").write_bytes(image_of[best.image_id])
        (out / "examples" / f"{stem}_mask.png").write_bytes(schema.encode_mask(best.mask))
        examples.append(
            {
                "caption": f"{model} / {instance} (score {best.score:.3f})",
                "image": f"examples/{stem}_image.png",
                "mask": f"examples/{stem}_mask.png",
            }
        )
    return examples


def build(
    cfg: ExperimentConfig, out: Path, instances: list[str], adapters: dict[str, Path], tables: dict[str, pa.Table]
) -> int:
    per_instance: dict[str, dict] = {i: {} for i in instances}
    pr_curves: dict[str, dict] = {"pretrained": {}, "personalized": {}}
    saved: dict[str, dict] = {"pretrained": {}, "personalized": {}}
    examples: list[dict] = []
    owners = {"": list(instances)} | {str(adapters[i]): [i] for i in instances}
    log.info("evaluate: pretrained %s and %d personalized encoders, one actor pool", cfg.model.backbone, len(instances))
    features = compute_features(cfg, tables, owners)
    metrics, curves, predictions = evaluate_encoder(cfg, tables, features[""], instances)
    for instance in instances:
        per_instance[instance]["pretrained"] = metrics[instance]
    pr_curves["pretrained"], saved["pretrained"] = curves, predictions
    examples += _save_examples(out, "pretrained", predictions, tables["dense"])
    personalized_predictions = {}
    for index, instance in enumerate(instances, 1):
        log.info("evaluate: [%d/%d] personalized encoder of %s", index, len(instances), instance)
        metrics, curves, predictions = evaluate_encoder(cfg, tables, features[str(adapters[instance])], [instance])
        per_instance[instance]["personalized"] = metrics[instance]
        pr_curves["personalized"].update(curves)
        personalized_predictions.update(predictions)
        log.info("evaluate: %s %s", instance, {k: round(v, 4) for k, v in metrics[instance].items()})
    saved["personalized"] = personalized_predictions
    examples += _save_examples(out, "personalized", personalized_predictions, tables["dense"])

    summary = {
        model: {
            key: _mean([per_instance[i][model][key] for i in instances]) for key in per_instance[instances[0]][model]
        }
        for model in ("pretrained", "personalized")
    }
    summary["per_instance"] = per_instance
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "pr_curves.json").write_text(
        json.dumps(
            {
                model: {i: {"precision": p.tolist(), "recall": r.tolist()} for i, (p, r) in curves.items()}
                for model, curves in pr_curves.items()
            }
        )
    )
    (out / "predictions.json").write_text(
        json.dumps(
            {
                model: {
                    i: [{"image_id": p.image_id, "box": list(p.box), "score": p.score} for p in found]
                    for i, found in by_instance.items()
                }
                for model, by_instance in saved.items()
            },
            indent=1,
        )
    )
    (out / "mask_examples.json").write_text(json.dumps(examples, indent=2))
    return len(instances)


def run(cfg: ExperimentConfig) -> Path:
    ingest = stage_dir(cfg, "ingest")
    images_path, instances_path = ingest / "images.parquet", ingest / "instances.json"
    if not images_path.exists() or not instances_path.exists():
        raise MissingInputError(f"{ingest}: images.parquet / instances.json missing; run `personalize ingest` first")
    instances_info = json.loads(instances_path.read_text())
    instances = without_failed(cfg, STAGE, common.select_instances(cfg, instances_info))
    adapters = {i: stage_dir(cfg, "train", i) for i in instances}
    missing = [
        i for i, path in adapters.items() if read_manifest(path) is None and not (path / "adapter_config.json").exists()
    ]
    if missing:
        raise MissingInputError(
            f"no personalized encoder for {missing} under {stage_dir(cfg, 'train')}; run `personalize train` first"
        )
    tables = _load_tables(images_path, instances_info)
    have_test = set(tables["test"]["instance_id"].to_pylist())
    skipped = {i: "no test images" for i in instances if i not in have_test}
    evaluated = [i for i in instances if i in have_test]
    if skipped:
        log.info("evaluate: %s", skip_note(skipped))
    if any(t in DENSE_TASKS for t in cfg.evaluate.tasks):
        masked = tables["train"].filter(pc.is_valid(tables["train"]["mask"]))
        unmasked = sorted(set(evaluated) - set(masked["instance_id"].to_pylist()))
        if unmasked:
            raise UserError(
                f"{images_path}: instances {unmasked} have no masked train image, and detection/segmentation take "
                "the reference from the object's mask; add train_masks/<instance>/ and re-run `personalize ingest`, "
                "or drop detection and segmentation from evaluate.tasks"
            )
    config = {"model": to_dict(cfg.model), "evaluate": without_placement(cfg.evaluate), "instances": instances}
    inputs = {"ingest": ingest, **{f"train/{i}": path for i, path in adapters.items()}}

    def make(tmp: Path) -> int:
        count = build(cfg, tmp, evaluated, adapters, tables) if evaluated else write_empty(tmp)
        if skipped:  # the instances without test images: listed, with the one-line note, beside the metrics
            metrics = json.loads((tmp / "metrics.json").read_text())
            metrics.update(skipped=skipped, note=skip_note(skipped))
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return count

    if not evaluated:  # nothing to embed: no Ray needed
        return commit_stage(stage_dir(cfg, STAGE), STAGE, config, make, inputs=inputs, resolved_config=resolved(cfg))
    with ray_session(cfg):
        return commit_stage(stage_dir(cfg, STAGE), STAGE, config, make, inputs=inputs, resolved_config=resolved(cfg))


def skip_note(skipped: dict[str, str]) -> str:
    return (
        f"Benchmark metrics skipped for {', '.join(sorted(skipped))}: no test images (every photo of a plain "
        "folder trains the encoder; a PODS-style test/ folder is what evaluate measures on)."
    )


def write_empty(out: Path) -> int:
    """The outputs of an evaluation with no instance to measure: empty metrics, curves and examples."""
    (out / "metrics.json").write_text(json.dumps({"pretrained": {}, "personalized": {}, "per_instance": {}}))
    (out / "pr_curves.json").write_text(json.dumps({"pretrained": {}, "personalized": {}}))
    (out / "predictions.json").write_text(json.dumps({"pretrained": {}, "personalized": {}}))
    (out / "mask_examples.json").write_text("[]")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def run_and_note(cfg: ExperimentConfig) -> Path:
        out = run(cfg)
        note = json.loads((out / "metrics.json").read_text()).get("note")
        if note:
            print(f"{STAGE}: {note}")
        return out

    return stage_main(STAGE, run_and_note, argv)
