"""`personalize run` end to end on a tiny toy benchmark with the zoo's tiny DINOv2, through the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from personalization.artifacts import MANIFEST
from personalization.datasets import make_toy
from personalization.zoo import build_zoo
from pipelines import cli
from pipelines.run import METRIC_KEYS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    toy = make_toy(
        root / "toy",
        categories=("mug", "tote"),
        val_per_category=1,
        test_per_category=1,
        test_per_split=2,
        dense_per_instance=1,
        size=64,
    )
    zoo = build_zoo(root / "zoo", parts=["dinov2"])
    return root, toy, zoo["dinov2"]


def _argv(toy, weights, out, *extra):
    return [
        "run",
        "--config",
        "configs/demo.yaml",
        f"data.root={toy}",
        f"output_dir={out}",
        "model.backbone=dinov2_vitb14",
        f"model.weights={weights}",
        "model.image_size=56",
        "train.num_triplets=32",
        "train.epochs=6",
        "train.augment=false",
        "train.batch_size=8",
        "train.learning_rate=0.003",
        "model.lora_dropout=0.0",
        "cutpaste.images_per_instance=8",
        "cutpaste.image_size=64",
        "evaluate.dense_image_size=112",
        "ray.num_cpus=2",
        *extra,
    ]


def test_run_writes_summary_report_and_skips_when_rerun(workspace, capsys):
    root, toy, weights = workspace
    out = root / "out"
    assert cli.main(_argv(toy, weights, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instances"] == ["mug_01", "tote_01"] and summary["backbone"] == "dinov2_vitb14"
    for model in ("pretrained", "personalized"):
        assert set(summary["metrics"][model]) == set(METRIC_KEYS)
        values = [summary["metrics"][model][k] for k in METRIC_KEYS]
        assert all(0.0 <= v <= 1.0 for v in values if not np.isnan(v)), values
        assert set(summary["per_instance"]["mug_01"][model]) == set(METRIC_KEYS)
    report = (out / "report.html").read_text()
    assert "Training loss" in report and "data:image/png;base64" in report
    for instance in summary["instances"]:  # the tiny ViT trains through the same path: its loss falls
        loss = json.loads((out / "train" / instance / "metrics.json").read_text())["loss"]
        assert np.mean(loss[-4:]) < 0.8 * np.mean(loss[:4]), loss  # last epoch vs first
        assert (out / "train" / instance / "adapter_model.safetensors").is_file()
    stages = ["ingest", "cutpaste", "train/mug_01", "train/tote_01", "evaluate"]
    manifests = {stage: (out / stage / MANIFEST).read_text() for stage in stages}

    assert cli.main(_argv(toy, weights, out)) == 0  # a re-run skips every finished stage
    assert {stage: (out / stage / MANIFEST).read_text() for stage in stages} == manifests
    assert "metric" in capsys.readouterr().out


def test_bad_input_fails_before_any_work(workspace, capsys, tmp_path):
    root, toy, weights = workspace
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_argv(toy, weights, tmp_path / "o1", "model.backbone=resnet9000"))
    assert exit_info.value.code == 2
    assert "model.backbone: 'resnet9000' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "ingest").exists()

    with pytest.raises(SystemExit):
        cli.main(_argv(toy, weights, tmp_path / "o2", "train.positive_sources=[dreambooth]"))
    assert "train.positive_sources has dreambooth but generate.enabled=false" in capsys.readouterr().err
