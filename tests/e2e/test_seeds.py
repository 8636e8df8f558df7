"""`personalize run` with run.seeds=[0,1] on the toy benchmark with the zoo's tiny DINOv2, through the real CLI:
the data stages once, train + evaluate per seed, the seeds' summary against numpy, then `personalize compare`."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from personalization.artifacts import MANIFEST
from personalization.datasets import TEST_SPLITS, make_toy
from pipelines import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_zoo):
    root = tmp_path_factory.mktemp("seeds")
    toy = make_toy(root / "toy", categories=("mug", "tote"), val_per_category=1, test_per_category=1,
                   test_per_split=2, dense_per_instance=0, size=64)  # fmt: skip
    return root, toy, tiny_zoo(["dinov2"])["dinov2"]


def _argv(toy, weights, out):
    return [
        "run", "--config", "configs/demo.yaml", f"data.root={toy}", f"output_dir={out}",
        "model.backbone=dinov2_vitb14", f"model.weights={weights}", "model.image_size=56", "train.num_triplets=16",
        "train.batch_size=8", "train.augment=false", "cutpaste.images_per_instance=4", "cutpaste.image_size=64",
        "evaluate.tasks=[classification,retrieval]", "evaluate.num_actors=1", "ray.num_cpus=2", "ray.dashboard=false",
        "data.max_instances=1", "run.seeds=[0,1]",
    ]  # fmt: skip


def test_seeds_share_the_data_stages_and_summarize_mean_and_sd(workspace, capsys, no_ray_in_process):
    root, toy, weights = workspace
    out = root / "out"
    assert cli.main(_argv(toy, weights, out)) == 0
    for seed in (0, 1):  # each seed reads the one ingest and cutpaste through relative links
        for stage in ("ingest", "cutpaste"):
            assert os.readlink(out / f"seed-{seed}" / stage) == f"../{stage}"
        assert not (out / f"seed-{seed}" / "train").is_symlink()
    assert not (out / "train").exists() and (out / "cutpaste" / "mug_01" / MANIFEST).is_file()
    adapters = [load_file(out / f"seed-{s}" / "train" / "mug_01" / "adapter_model.safetensors") for s in (0, 1)]
    assert adapters[0].keys() == adapters[1].keys()
    assert any(not np.array_equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # the seed changes training

    seeds = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["runs"] == {"0": "seed-0", "1": "seed-1"} and summary["failed"] == {}
    for model in ("pretrained", "personalized"):
        for key in ("classification/pr_auc", "retrieval/ndcg"):
            values = np.array([s["metrics"][model][key] for s in seeds])
            assert summary["metrics"][model][key] == pytest.approx(values.mean())
            assert summary["metrics_sd"][model][key] == pytest.approx(values.std(ddof=1))
        assert sorted(seeds[0]["per_split"][model]) == sorted(TEST_SPLITS)  # the toy has every PODS test split
        pose = np.array([s["per_split"][model]["pose"]["classification/pr_auc"] for s in seeds])
        assert summary["per_split"][model]["pose"]["classification/pr_auc"] == pytest.approx(pose.mean())
    assert summary["metrics_sd"]["pretrained"]["retrieval/ndcg"] == 0.0  # the pretrained encoder has no seed
    assert not math.isnan(summary["metrics_sd"]["personalized"]["classification/pr_auc"])
    for folder in (out / "seed-0", out):
        assert "data:image/png;base64" in (folder / "report.html").read_text()
    assert "Per test split" in (out / "seed-1" / "report.html").read_text()
    assert "## classification/pr_auc per test split" in (out / "comparison.md").read_text()

    manifests = {p: p.read_text() for p in out.rglob(MANIFEST)}
    assert cli.main(_argv(toy, weights, out)) == 0  # a re-run skips every finished stage of every seed
    assert {p: p.read_text() for p in out.rglob(MANIFEST)} == manifests
    capsys.readouterr()
    assert cli.main(["compare", str(out), str(out / "seed-0")]) == 0
    printed = capsys.readouterr().out
    value = summary["metrics"]["personalized"]["classification/pr_auc"]
    sd = summary["metrics_sd"]["personalized"]["classification/pr_auc"]
    assert f"| {out} | 2 | personalized | {value:.3f} ± {sd:.3f} |" in printed
