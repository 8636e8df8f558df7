"""The Ray-free parts of per-object evaluation: image sets and streamed rows, RLE COCO, result and summary files."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from personalization import schema
from personalization.artifacts import MANIFEST, commit_stage, is_current, read_manifest
from personalization.errors import MissingInputError
from personalization.evaluation.coco import encode_annotation, encode_prediction, evaluate_coco, evaluate_coco_compact
from personalization.evaluation.dense import DensePrediction, mask_box
from personalization.evaluation.extract import FeatureExtractor
from personalization.evaluation.images import iter_rows, load_evaluation_images, load_instances_file
from personalization.evaluation.measure import EvaluationInputs, evaluate_encoder, merge_results, split_tasks
from personalization.evaluation.outputs import commit_files, load_result, save_result, write_summary

HW = (40, 50)


def random_mask(rng, hw=HW):
    mask = np.zeros(hw, bool)
    top, left = rng.integers(0, hw[0] - 8), rng.integers(0, hw[1] - 8)
    mask[top : top + rng.integers(4, 20), left : left + rng.integers(4, 20)] = True
    mask[rng.random(hw) < 0.03] = True  # speckle: RLE and area must follow every pixel
    return mask


def test_rle_forms_give_the_numbers_of_full_masks():
    rng = np.random.default_rng(0)
    images = {f"img{k}": HW for k in range(6)}
    gt = {f"img{k}": random_mask(rng) for k in range(3)}
    gt["img2"] = np.zeros(HW, bool)  # an empty annotation: the image stays, without ground truth
    near = [gt["img0"] & (rng.random(HW) < 0.8), np.roll(gt["img1"], 2, axis=1), gt["img0"] | random_mask(rng)]
    masks = [*near, *(random_mask(rng) for _ in range(6))]
    image_ids = ["img0", "img1", "img0", *(f"img{k % 6}" for k in range(6))]
    predictions = [
        DensePrediction(i, m, mask_box(m), float(rng.random())) for i, m in zip(image_ids, masks, strict=True)
    ]
    full = evaluate_coco(images, gt, predictions)
    compact = evaluate_coco_compact(
        images, {i: encode_annotation(m) for i, m in gt.items()}, [encode_prediction(p) for p in predictions]
    )
    assert compact == full and 0.0 < full["segmentation/ap50"] < 1.0
    assert encode_annotation(np.zeros(HW, bool)) is None
    nan = evaluate_coco_compact(images, {}, [encode_prediction(predictions[0])], tasks=("detection",))
    assert math.isnan(nan["detection/ap"])
    with pytest.raises(ValueError, match="mask of img0 is"):
        evaluate_coco_compact({"img0": (10, 10)}, {"img0": encode_annotation(gt["img0"])}, [])


def write_table(path, rows):
    schema.write_image_table([schema.make_row(**row) for row in rows], path)


def row(instance, role, split, k, mask=True):
    image = Image.fromarray(np.full((12, 16, 3), 10 * k, np.uint8))
    mask = np.ones((12, 16), bool) if mask else None
    image_id = f"{instance}-{role}-{split}-{k}"
    return dict(image_id=image_id, instance_id=instance, category="mug", role=role, source="real", split=split,
                image=image, mask=mask)  # fmt: skip


@pytest.fixture
def two_shards(tmp_path):
    """A folder of two shards: a (test_dense split present), b (no test_dense: masked tests are dense), v (val)."""
    folder = tmp_path / "images"
    write_table(
        folder / "0.parquet",
        [
            row("a", "real_train", "train", 0),
            row("a", "real_test", "in", 1),
            row("a", "real_test", "test_dense", 2),
            row("v", "real_train", "train", 3),
        ],
    )
    write_table(
        folder / "1.parquet",
        [
            row("b", "real_train", "train", 4, mask=False),
            row("b", "real_test", "in", 5),
            row("b", "real_train", "train", 6),
            row("a", "real_test", "test_dense", 7),
        ],
    )
    return folder  # fmt: skip


def test_evaluation_sets_follow_ingest_order_and_the_split_rules(two_shards):
    info = {"a": {"split": "test"}, "b": {"split": "test"}, "v": {"split": "val"}}
    sets = load_evaluation_images(two_shards, info)
    assert sets.train == ["a-real_train-train-0", "b-real_train-train-4", "b-real_train-train-6"]
    assert sets.test == ["a-real_test-in-1", "b-real_test-in-5"]  # val instance v is not in the population
    assert sets.dense == ["a-real_test-test_dense-2", "a-real_test-test_dense-7"]
    assert sets.masked_train("b") == ["b-real_train-train-6"] and sets.size["a-real_test-in-1"] == (12, 16)
    assert sets.instances_with_test_images() == {"a", "b"}
    # Without any test_dense image, the masked test images are the dense set.
    only_a = load_evaluation_images(two_shards, {"a": {"split": "test"}})
    assert only_a.test == ["a-real_test-in-1"] and only_a.dense == sets.dense


def test_iter_rows_streams_the_asked_rows_in_order_in_batches(two_shards):
    wanted = ["b-real_test-in-5", "a-real_train-train-0", "a-real_test-test_dense-7", "v-real_train-train-3"]
    batches = list(iter_rows(two_shards, wanted, ["image", "mask"], batch_size=3))
    assert [b.num_rows for b in batches] == [3, 1]
    assert batches[0].column_names == ["image_id", "image", "mask"]
    ids = [i for b in batches for i in b["image_id"].to_pylist()]
    assert ids == ["a-real_train-train-0", "v-real_train-train-3", "b-real_test-in-5", "a-real_test-test_dense-7"]
    assert schema.decode_image(batches[0]["image"][0].as_py()).size == (16, 12)


IMAGE = schema.encode_png(Image.new("RGB", (6, 6), (200, 10, 10)))


def result(score, ndcg, example=True):
    mask = np.zeros((6, 6), bool)
    mask[1:4, 2:5] = True
    return {
        "metrics": {"classification/pr_auc": score, "retrieval/ndcg": ndcg},
        "curve": {"precision": [0.5, 1.0], "recall": [1.0, 0.0]},
        "predictions": [{"image_id": "img", "box": [2.0, 1.0, 3.0, 3.0], "score": score}],
        "example": {"image_id": "img", "score": score, "image": IMAGE, "rle": encode_prediction(
            DensePrediction("img", mask, mask_box(mask), score))["rle"]} if example else None,
    }  # fmt: skip


def test_results_and_summary_keep_the_output_formats(tmp_path):
    out = tmp_path / "evaluate"
    units = {"pretrained": {}, "personalized": {}}
    for k, instance in enumerate(["e", "d", "c", "b", "a"]):  # evaluation order, not sorted
        for model, ndcg in (("pretrained", math.nan if instance == "a" else 0.5), ("personalized", 0.25 * k)):
            folder = out / model / instance
            build = lambda tmp, k=k, ndcg=ndcg, i=instance: save_result(tmp, result(0.1 * k, ndcg, example=i != "b"))  # noqa: E731
            commit_stage(folder, "evaluate", {"unit": [model, instance]}, build)
            units[model][instance] = folder
    example = load_result(units["pretrained"]["c"])["example"]
    assert example == {"image_id": "img", "score": 0.2, "mask": "example_mask.png", "image": "example_image.png"}

    commit_files(out, "evaluate", {"top": 1}, lambda tmp: write_summary(tmp, units))
    assert is_current(out, "evaluate", {"top": 1}) and read_manifest(out)["rows"] == 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["pretrained", "personalized", "per_instance"]
    assert list(metrics["per_instance"]) == ["e", "d", "c", "b", "a"]
    assert metrics["pretrained"]["retrieval/ndcg"] == 0.5  # NaN skipped by the mean
    assert metrics["personalized"]["classification/pr_auc"] == pytest.approx(0.2)
    assert metrics["per_instance"]["d"]["personalized"] == {"classification/pr_auc": 0.1, "retrieval/ndcg": 0.25}
    curves = json.loads((out / "pr_curves.json").read_text())
    assert curves["personalized"]["a"] == {"precision": [0.5, 1.0], "recall": [1.0, 0.0]}
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["pretrained"]["e"] == [{"image_id": "img", "box": [2.0, 1.0, 3.0, 3.0], "score": 0.0}]
    examples = json.loads((out / "mask_examples.json").read_text())
    # The first four instances sorted (a, b, c, d) per model; b has no prediction on its own images.
    assert [e["caption"] for e in examples][:3] == ["pretrained / a (score 0.400)", "pretrained / c (score 0.200)",
                                                    "pretrained / d (score 0.100)"]  # fmt: skip
    assert len(examples) == 6
    mask = schema.decode_mask((out / examples[0]["mask"]).read_bytes())
    assert mask.sum() == 9 and mask[1:4, 2:5].all()
    assert (out / examples[0]["image"]).read_bytes() == IMAGE

    # A second summary replaces the files, drops stale examples and keeps every committed unit.
    manifests = {p: p.read_bytes() for p in out.glob(f"*/*/{MANIFEST}")}
    commit_files(out, "evaluate", {"top": 2}, lambda tmp: (tmp / "metrics.json").write_text("{}") and 0)
    assert json.loads((out / "metrics.json").read_text()) == {} and not (out / "examples").exists()
    assert {p: p.read_bytes() for p in out.glob(f"*/*/{MANIFEST}")} == manifests
    assert is_current(out, "evaluate", {"top": 2}) and not list(tmp_path.glob(".evaluate.summary-*"))


def test_a_crashed_summary_leaves_no_manifest_no_scratch_and_keeps_the_units(tmp_path):
    out = tmp_path / "evaluate"
    one = lambda tmp: save_result(tmp, result(0.5, 0.5))  # noqa: E731
    unit = commit_stage(out / "pretrained" / "a", "evaluate", {"unit": 1}, one)
    commit_files(out, "evaluate", {"top": 1}, lambda tmp: (tmp / "metrics.json").write_text('{"old": 1}') and 1)

    def crash(tmp):
        (tmp / "metrics.json").write_text("{}")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        commit_files(out, "evaluate", {"top": 2}, crash, resolved_config={"name": "n"})
    assert read_manifest(out) is None and not list(tmp_path.glob(".evaluate.summary-*"))
    assert json.loads((out / "metrics.json").read_text()) == {"old": 1}  # nothing renamed before the build ended
    assert read_manifest(unit)["rows"] == 1 and not (out / "config.yaml").exists()
    commit_files(out, "evaluate", {"top": 2}, lambda tmp: (tmp / "metrics.json").write_text("{}") and 0,
                 resolved_config={"name": "n"})  # fmt: skip
    assert is_current(out, "evaluate", {"top": 2}) and (out / "config.yaml").read_text() == "name: n\n"


def test_evaluate_encoder_results_do_not_depend_on_the_streamed_batch_size(two_shards):
    extractor = FeatureExtractor({"backbone": "mobilenetv2", "image_size": 32}, device="cpu")
    sets = load_evaluation_images(two_shards, {"a": {"split": "test"}, "b": {"split": "test"}})
    tasks = ("classification", "retrieval", "detection", "segmentation")
    found = [
        evaluate_encoder(extractor, EvaluationInputs(two_shards, sets, ["a", "b"], tasks, batch, min_object_pixels=1))
        for batch in (1, 8)
    ]
    assert found[0] == found[1] and list(found[0]) == ["a", "b"]
    assert set(found[0]["a"]) == {"metrics", "curve", "split_metrics", "predictions", "example"}
    assert 0.0 <= found[0]["a"]["metrics"]["classification/pr_auc"] <= 1.0
    assert {p["image_id"] for p in found[0]["a"]["predictions"]} <= set(sets.dense)


def test_an_encoder_evaluated_in_parts_gives_exactly_the_whole_result(two_shards):
    """The embedding part and the dense part, each streaming every task's images, merge into the one-call result:
    the same metrics (in the same order), curves, split metrics, predictions and example, to the last bit."""
    extractor = FeatureExtractor({"backbone": "mobilenetv2", "image_size": 32}, device="cpu")
    sets = load_evaluation_images(two_shards, {"a": {"split": "test"}, "b": {"split": "test"}})
    tasks = ("detection", "classification", "segmentation", "retrieval")
    assert split_tasks(tasks) == [("classification", "retrieval"), ("detection", "segmentation")]
    assert split_tasks(["retrieval"]) == [("retrieval",)]
    assert split_tasks([]) == [()]

    def evaluate(part):
        inputs = EvaluationInputs(two_shards, sets, ["a", "b"], part, 3, min_object_pixels=1, streamed=tasks)
        return evaluate_encoder(extractor, inputs)

    whole, parts = evaluate(tasks), [evaluate(part) for part in split_tasks(tasks)]
    assert not parts[0]["a"]["predictions"] and parts[1]["a"]["curve"] is None  # each part holds only its own
    for instance in ("a", "b"):
        merged = merge_results([part[instance] for part in parts])
        assert merged == whole[instance] and list(merged["metrics"]) == list(whole[instance]["metrics"])
        assert list(merged) == list(whole[instance])
    assert whole["a"]["predictions"] and whole["a"]["example"] is not None


def test_instances_file_is_read_beside_the_table_and_its_absence_says_what_to_run(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps({"mug": {"category": "mug", "split": "test"}}))
    assert load_instances_file(tmp_path) == {"mug": {"category": "mug", "split": "test"}}
    with pytest.raises(MissingInputError, match=r"nope/instances.json is missing: run `personalize ingest`"):
        load_instances_file(tmp_path / "nope")
