"""`from personalization import load_encoder`: a run's OUT/train/<instance>/ back as an embedder, without Ray.

The run folder is made the way the train stage leaves it: the real ImageNet MobileNetV2 with LoRA (weights moved
off their zero init, as training would), saved by the library's ``save_adapter`` beside the resolved config, next
to an ``OUT/ingest`` image table holding the object's photos.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_ingest import write_ingest

from personalization import load_encoder
from personalization.config import build_config, save_config
from personalization.errors import MissingInputError
from personalization.evaluation.extract import FeatureExtractor
from personalization.models import apply_lora, build_encoder, save_adapter
from personalization.personal_encoder import localize
from personalization.schema import encode_png

MODEL = {"backbone": "mobilenetv2", "image_size": 64, "lora_alpha": 16.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """OUT with ingest (objects "mug_1" and "cup_2", 3 photos each) and train/mug_1 (a moved LoRA adapter)."""
    out = tmp_path_factory.mktemp("run") / "out"
    photos = write_ingest(out, {"mug_1": "mug", "cup_2": "mug"}, photos=3, size=48)
    cfg = build_config({"output_dir": str(out), "model": MODEL})
    encoder = apply_lora(build_encoder(cfg.model), cfg.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # a trained adapter: B no longer zero, so the output changes
    adapter = save_adapter(encoder, out / "train" / "mug_1")
    save_config(cfg, adapter / "config.yaml")
    return out, photos


def test_embeddings_are_unit_deterministic_and_personalized(run, tmp_path):
    out, photos = run
    paths = []
    for k, image in enumerate(photos["cup_2"]):
        paths.append(tmp_path / f"photo_{k}.jpg")
        image.save(paths[-1], quality=95)
    enc = load_encoder(out / "train" / "mug_1")
    images = [*paths, photos["mug_1"][0]]  # paths and a PIL image, mixed
    first, again = enc.embed(images), enc.embed(images)
    assert first.shape == (4, 1280) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, again)  # eval mode: no LoRA dropout, no batch statistics
    base = enc.pretrained().embed(images)
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-5)
    assert np.abs(first - base).max() > 1e-2  # the adapter changes the embedding
    np.testing.assert_array_equal(load_encoder(out / "train" / "mug_1", pretrained=True).embed(images), base)


def test_embeddings_match_evaluation(run):
    """The same image gives the same vector as evaluate's FeatureExtractor (PNG bytes, eval transform)."""
    out, photos = run
    enc = load_encoder(out / "train" / "mug_1", batch_size=2)  # batched in two chunks
    extractor = FeatureExtractor(dict(MODEL), str(out / "train" / "mug_1"))
    pngs = [encode_png(image) for image in photos["cup_2"] + photos["mug_1"][:1]]
    np.testing.assert_allclose(enc.embed(photos["cup_2"] + photos["mug_1"][:1]), extractor.embed(pngs), atol=1e-5)


def test_score_is_max_cosine_to_the_objects_own_photos(run):
    out, photos = run
    enc = load_encoder(out / "train" / "mug_1")
    own, other = photos["mug_1"], photos["cup_2"]
    np.testing.assert_allclose(enc.score(own), 1.0, atol=1e-5)  # each photo is one of the references
    expected = (enc.embed(other) @ enc.embed(own).T).max(axis=1)
    np.testing.assert_allclose(enc.score(other), expected, atol=1e-5)
    assert (enc.score(other) < 0.999).all()
    shifted = Image.fromarray(255 - np.asarray(own[0]))
    assert enc.score([shifted])[0] < 0.999


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("missing", "does not exist or is not a folder; expected OUT/train/<instance>/"),
        ("out", "pass one of the encoders in it: {out}/train/mug_1"),
        ("train", "pass one of the encoders in it: {out}/train/mug_1"),
        ("no_config", "has no config.yaml"),
    ],
)
def test_a_wrong_folder_names_itself_and_what_is_expected(run, tmp_path, where, expected):
    out, _ = run
    folder = {"missing": tmp_path / "nope", "out": out, "train": out / "train", "no_config": tmp_path / "bare"}[where]
    if where == "no_config":
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(MissingInputError) as error:
        load_encoder(folder)
    assert str(folder) in str(error.value) and expected.format(out=out) in str(error.value)


def test_import_loads_no_model_library():
    code = "import sys, personalization; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_localize_returns_evaluations_dense_prediction_per_image(run, tmp_path):
    out, photos = run
    big = photos["mug_1"][1].resize((96, 72))
    found = localize(out / "train" / "mug_1", [photos["mug_1"][0], big, tmp_path / "gone.jpg"], max_side=64,
                     dense_size=64, min_object_pixels=4)  # fmt: skip
    assert len(found) == 3 and found[2] is None  # an unreadable image has no prediction, and raises nothing
    assert found[0].mask.shape == (48, 48) and found[1].mask.shape == (48, 64)  # at most max_side px
    for prediction in found[:2]:
        x, y, w, h = prediction.box
        height, width = prediction.mask.shape
        assert prediction.mask.any() and 0 <= x < x + w <= width and 0 <= y < y + h <= height
        assert -1.0 <= prediction.score <= 1.0
