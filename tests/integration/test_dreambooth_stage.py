import json

import pytest
import torch
from tiny_ingest import write_ingest

from personalization.artifacts import read_manifest
from personalization.config import build_config
from personalization.schema import read_image_table
from personalization.synthesis.saved_generator import DreamboothError, load_personalized_pipeline
from personalization.zoo.diffusion import build_stable_diffusion
from pipelines import dreambooth

SIZE = 32
INSTANCES = {"mug_1": "mug", "mug_2": "mug"}


def _ingest(out, with_masks=True):
    write_ingest(out, INSTANCES, size=SIZE, mask="box" if with_masks else None)


def _cfg(sd, out, **db):
    settings = {
        "enabled": True,
        "base_model": str(sd),
        "steps": 2,
        "learning_rate": 1e-3,
        "resolution": SIZE,
        "class_images": 2,
        "mode": "full",
    }
    settings.update(db)
    return build_config({"output_dir": str(out), "dreambooth": settings, "generate": {"steps": 2}})


@pytest.mark.slow
def test_dreambooth_stage_trains_each_instance_and_shares_class_images(tmp_path, ray_local):
    from diffusers import StableDiffusionPipeline

    sd = build_stable_diffusion(tmp_path / "zoo")
    out = tmp_path / "out"
    _ingest(out)
    cfg = _cfg(sd, out)
    dreambooth.run(cfg)
    classes = out / "dreambooth" / "class_images" / "mug"
    assert read_manifest(classes)["rows"] == 2
    assert read_image_table(classes).num_rows == 2
    assert not (out / "dreambooth" / "class_images" / "shoe").exists()
    base = StableDiffusionPipeline.from_pretrained(sd)
    for iid in INSTANCES:
        folder = out / "dreambooth" / iid
        assert read_manifest(folder) is not None
        assert len(json.loads((folder / "metrics.json").read_text())["dreambooth/loss"]) == 2
        tuned = load_personalized_pipeline(folder)
        assert not torch.equal(tuned.unet.conv_in.weight, base.unet.conv_in.weight)
        assert not (folder / "vae").exists()  # the frozen parts stay with the base model
    assert not (out / "dreambooth" / ".ray").exists() and not (out / "dreambooth" / ".work").exists()
    created = read_manifest(out / "dreambooth" / "mug_1")["created"]
    dreambooth.run(cfg)  # finished: skipped
    assert read_manifest(out / "dreambooth" / "mug_1")["created"] == created


def test_maskless_instance_fails_before_training(tmp_path):
    sd = build_stable_diffusion(tmp_path / "zoo")
    out = tmp_path / "out"
    _ingest(out, with_masks=False)
    with pytest.raises(DreamboothError, match="mug_1.*without masks"):
        dreambooth.run(_cfg(sd, out, masked=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DreamboothError, match="model_index.json"):
        dreambooth.run(_cfg(tmp_path / "empty", out, masked=False))
