import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics.pairwise import cosine_similarity

from personalization.filtering import (
    DreamSimEmbedder,
    EmbedderError,
    PatchMasker,
    Scorer,
    check_dreamsim_cache,
    compute_scores,
    crop_box,
    mask_box,
    take_until_accepted,
)
from personalization.schema import make_row, read_image_table, write_image_table
from personalization.zoo.dreamsim import DREAMSIM_TYPE, build_dreamsim_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_dreamsim_cache(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def offline():
    """Any download attempt by dreamsim fails loudly (the cache must be complete)."""
    original = torch.hub.download_url_to_file

    def refuse(*args, **kwargs):
        raise AssertionError(f"dreamsim tried to download {args}")

    torch.hub.download_url_to_file = refuse
    yield
    torch.hub.download_url_to_file = original


@pytest.fixture(scope="module")
def embedder(cache, offline):
    return DreamSimEmbedder(cache, DREAMSIM_TYPE, device="cpu")


def _scene(seed, box=(8, 8, 40, 40), size=64):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    return Image.fromarray(pixels), mask


def test_real_dreamsim_loads_tiny_cache_offline(embedder):
    images = [_scene(i)[0] for i in range(3)]
    emb = embedder.embed(images)
    assert emb.shape == (3, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(embedder.embed(images[:1]), emb[:1], atol=1e-5, rtol=1e-5)
    # DreamSim's own distance agrees: cos(e_a, e_b) = 1 - dreamsim(a, b)
    pixels = embedder._pixels(images)
    distance = embedder.model(pixels[:1], pixels[1:2])
    torch.testing.assert_close(1 - distance, (emb[0] @ emb[1]).reshape(1), atol=1e-4, rtol=1e-4)
    assert embedder.patch_features(images).shape == (3, 7, 7, 768)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(EmbedderError, match="lacks.*clip_vitb32_pretrain"):
        check_dreamsim_cache(tmp_path, "clip_vitb32")
    with pytest.raises(EmbedderError, match="dreamsim_type"):
        check_dreamsim_cache(tmp_path, "nope")


def test_compute_scores_matches_sklearn():
    gen = F.normalize(torch.randn(5, 8), dim=1)
    real = F.normalize(torch.randn(3, 8), dim=1)
    expected = cosine_similarity(gen.numpy(), real.numpy()).mean(axis=1)
    np.testing.assert_allclose(compute_scores(gen, real).numpy(), expected, atol=1e-6)


def test_scorer_scores_against_real_crops(embedder, cache, tmp_path):
    rows = []
    for k in range(3):
        image, mask = _scene(k)
        rows.append(
            make_row(
                image_id=f"r{k}",
                instance_id="mug_1",
                category="mug",
                role="real_train",
                source="real",
                split="train",
                image=image,
                mask=mask,
            )
        )
    write_image_table(rows, tmp_path / "real.parquet")
    scorer = Scorer(
        str(tmp_path / "real.parquet"), str(cache), dreamsim_type=DREAMSIM_TYPE, masker="none", device="cpu"
    )
    real_crops = [crop_box(_scene(k)[0], mask_box(_scene(k)[1])) for k in range(3)]
    generated = [real_crops[0], _scene(7)[0]]
    batch = {
        "instance_id": np.array(["mug_1", "mug_1", "dog_2"], dtype=object),
        "image": np.array([_png(im) for im in generated + generated[:1]], dtype=object),
    }
    out = scorer(batch)
    real_emb = embedder.embed(real_crops).numpy()
    gen_emb = embedder.embed(generated).numpy()
    expected = cosine_similarity(gen_emb, real_emb).mean(axis=1)
    np.testing.assert_allclose(np.array(out["score"][:2], dtype=float), expected, atol=1e-4)
    assert out["score"][2] is None  # no real photos of dog_2: left unscored
    assert out["score"][0] > out["score"][1]  # a copy of a real crop beats noise


def _png(image):
    from personalization.schema import encode_png

    return encode_png(image)


class ColorCells:
    """A transparent embedder for testing localisation: patch feature = mean colour of each 8x8 cell."""

    device = torch.device("cpu")

    def patch_features(self, images):
        feats = [
            F.avg_pool2d(torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1)[None], 8)[0] for im in images
        ]
        return F.normalize(torch.stack(feats).permute(0, 2, 3, 1) - 127.5, dim=-1)


def test_patch_masker_finds_the_object_box():
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 2] = 200  # blue background
    real = red.copy()
    real[8:32, 8:32] = (220, 20, 20)  # red object
    mask = np.zeros((64, 64), bool)
    mask[8:32, 8:32] = True
    generated = red.copy()
    generated[32:56, 16:48] = (220, 20, 20)  # the object elsewhere, another size
    masker = PatchMasker(ColorCells(), threshold=0.5).fit([Image.fromarray(real)], [mask])
    assert masker.boxes([Image.fromarray(generated)]) == [(16, 32, 48, 56)]


def test_take_until_accepted_stops_once_every_instance_has_n():
    def batches():
        for i in range(100):
            yield {"instance_id": np.array(["a", "b"]), "score": np.array([0.7 if i % 2 else 0.1, 0.9], object)}

    seen = list(take_until_accepted(batches(), {"a": 3, "b": 2}, threshold=0.6))
    assert len(seen) == 6  # "a" passes on batches 1, 3, 5
    seen = list(take_until_accepted(iter(seen[:2]), {"a": 3}, threshold=0.6))
    assert len(seen) == 2  # attempts exhausted first


def test_threshold_applied_at_read_time(tmp_path):
    image, _ = _scene(0, size=16)
    rows = [
        make_row(
            image_id=str(i), instance_id="a", category="mug", role="positive", source="dreambooth", image=image, score=s
        )
        for i, s in enumerate([0.2, 0.6, 0.9, None])
    ]
    write_image_table(rows, tmp_path / "t.parquet")
    kept = read_image_table(tmp_path / "t.parquet", min_score=0.6).column("image_id").to_pylist()
    assert sorted(kept) == ["1", "2", "3"]


def test_a_threshold_that_rejects_every_generated_positive_is_named(tmp_path):
    from personalization.config import TrainConfig
    from personalization.contrastive.data import TrainingSources, read_training_rows
    from personalization.contrastive.triplets import TripletError

    image, _ = _scene(0, size=16)

    def row(i, role, source, score=None):
        return make_row(image_id=str(i), instance_id="a", category="mug", role=role, source=source, image=image,
                        score=score)  # fmt: skip

    write_image_table([row(0, "real_train", "real")], tmp_path / "images.parquet")
    write_image_table([row(i, "positive", "dreambooth", s) for i, s in enumerate([0.31, 0.52], 1)], tmp_path / "pos")
    train = TrainConfig(positive_sources=["dreambooth"], negatives="val")
    instances = {"a": {"category": "mug", "split": "test"}}
    sources = TrainingSources(real=tmp_path / "images.parquet", positives=[tmp_path / "pos"], threshold=0.6)
    with pytest.raises(TripletError, match=r"filter.threshold=0.6 rejects all 2 generated positives .*best DreamSim "
                                           r"score is 0.520.*filter.threshold=0.52"):  # fmt: skip
        read_training_rows(sources, "a", train, instances)
    sources = dataclasses.replace(sources, threshold=0.5)
    assert read_training_rows(sources, "a", train, instances).positive_ids == ["2"]
