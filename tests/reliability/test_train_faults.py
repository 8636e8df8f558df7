"""A Ray Train worker killed mid-epoch: the run restarts from its last reported checkpoint (``FailureConfig``) and
ends with the same number of steps, on the production LoRA DINOv2 (tiny random weights from the zoo)."""

import json

import faults
import pytest

from personalization.config import build_config
from pipelines import cutpaste, ingest, train


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, toy):
    """OUT/ingest and OUT/cutpaste of the toy dataset (one test and one val mug)."""
    out = tmp_path_factory.mktemp("train-faults") / "out"
    cfg = build_config(
        {
            "output_dir": str(out),
            "data": {"root": str(toy)},
            "cutpaste": {"images_per_instance": 4, "image_size": 48},
        }
    )
    ingest.run(cfg)
    cutpaste.run(cfg)
    return out


def _cfg(out, zoo, **train):
    settings = dict(num_triplets=16, batch_size=4, epochs=2, num_workers=2, checkpoint_every=2, max_failures=1)
    settings.update(train)
    return build_config(
        {
            "output_dir": str(out),
            "model": {"backbone": "dinov2_vitb14", "weights": str(zoo["dinov2"]), "image_size": 28},
            "train": settings,
        }
    )


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_from_checkpoint(ray_local, upstream, zoo, tmp_path):
    # 16 triplets / (2 workers x 2) = 4 steps per epoch, 2 epochs = 8 steps, checkpoints at steps 2, 4, 6.
    total, last_checkpoint = 8, 2
    marker = tmp_path / "worker-died"
    cfg = _cfg(upstream, zoo)
    folder = train.run(cfg, build_model=faults.DyingModel(marker, at_step=last_checkpoint + 1, delay=60.0)) / "mug_01"
    assert faults.deaths(marker) == 1, "the fault was not injected"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["start_step"] == last_checkpoint, "did not resume from the last reported checkpoint"
    assert metrics["steps"] == total and len(metrics["loss"]) == total
    assert len(set(metrics["replica_hashes"])) == 1  # both restarted replicas hold the same weights
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "_manifest.json").is_file()

    # An uninterrupted run of the same config, in a fresh output folder: the same loss history, step for step.
    clean = tmp_path / "clean"
    clean.mkdir()
    for stage in ("ingest", "cutpaste"):
        (clean / stage).symlink_to(upstream / stage)
    reference = json.loads((train.run(_cfg(clean, zoo)) / "mug_01" / "metrics.json").read_text())
    assert reference["start_step"] == 0 and reference["steps"] == total
    assert metrics["loss"][:last_checkpoint] == reference["loss"][:last_checkpoint]
    assert metrics["loss"] == reference["loss"], "resumed training diverged from the uninterrupted run"
