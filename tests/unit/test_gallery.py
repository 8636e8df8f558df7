"""personalization.gallery: listing a photo folder, hashing and embedding batches, the Parquet cache, ranking."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from personalization import gallery
from personalization.gallery import EmbeddingCache, embed_items, list_gallery, rank_rows
from personalization.schema import encode_png


class MeanColour:
    """A 3-d encoder (unit mean RGB) with the PersonalEncoder ``embed`` contract; counts what it embeds."""

    def __init__(self):
        self.seen = 0

    def embed(self, images):
        self.seen += len(images)
        vectors = np.array([np.asarray(image.convert("RGB"), np.float32).mean(axis=(0, 1)) + 1 for image in images])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).reshape(-1, 3).astype(np.float32)


def _photo(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path)
    return path


def test_list_gallery_walks_folders_and_names_other_files(tmp_path):
    a = _photo(tmp_path / "b" / "a.png", (255, 0, 0))
    c = _photo(tmp_path / "c.JPG", (0, 255, 0))
    _photo(tmp_path / ".hidden" / "d.png", (0, 0, 255))
    (tmp_path / ".DS_Store").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    photos, skipped = list_gallery(tmp_path)
    assert photos == [c, a]  # sorted per folder, top level first; hidden entries never listed
    reasons = dict(skipped)
    assert set(reasons) == {str(tmp_path / "notes.txt"), str(tmp_path / "anim.gif")}
    assert "GIF" in reasons[str(tmp_path / "anim.gif")] and "not a photo" in reasons[str(tmp_path / "notes.txt")]


def test_embed_items_hashes_embeds_only_unknown_and_reports_bad_files(tmp_path):
    red, blue = _photo(tmp_path / "red.png", (255, 0, 0)), _photo(tmp_path / "blue.png", (0, 0, 255))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    reference = Image.new("RGB", (8, 8), (0, 255, 0))

    png = encode_png(reference)
    red_sha = hashlib.sha256(red.read_bytes()).hexdigest()
    encoders = {"personalized": MeanColour(), "pretrained": MeanColour()}
    paths = [str(red), str(blue), str(tmp_path / "bad.jpg"), str(tmp_path / "gone.png"), ""]
    found = embed_items(encoders, {"pretrained": {red_sha}}, paths, [b"", b"", b"", b"", png])
    assert found["sha256"][0] == red_sha and found["sha256"][4] == hashlib.sha256(png).hexdigest()
    assert [bool(e) for e in found["error"]] == [False, False, True, True, False]
    assert "bad.jpg" in found["error"][2] and "gone.png" in found["error"][3]
    assert (encoders["personalized"].seen, encoders["pretrained"].seen) == (3, 2)  # red known to pretrained
    assert found["pretrained"][0] == b"" and found["personalized"][0] != b""
    np.testing.assert_allclose(np.frombuffer(found["personalized"][1], np.float32), [1 / 256, 1 / 256, 1], rtol=1e-2)


def test_cache_round_trip_shards_and_scores(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery, "SHARD_ROWS", 2)
    cache = EmbeddingCache(tmp_path / "cache", "f" * 64)
    vectors = {f"h{k}": np.eye(3, dtype=np.float32)[k] for k in range(3)}
    for sha, vector in vectors.items():
        cache.add(sha, vector.tobytes())
    cache.flush()
    assert len(cache.shards()) == 2 and not list(cache.folder.glob(".*"))  # 2 + 1 rows; no temporary file left
    again = EmbeddingCache(tmp_path / "cache", "f" * 64)
    assert again.known() == set(vectors)
    np.testing.assert_array_equal(again.vectors(["h2", "h0"]), np.stack([vectors["h2"], vectors["h0"]]))
    references = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    assert again.score({"h0", "h1", "h9"}, references) == pytest.approx({"h0": 1.0, "h1": 0.8})
    with pytest.raises(KeyError, match="no embedding"):
        again.vectors(["h9"])
    assert EmbeddingCache(tmp_path / "cache", "e" * 64).known() == set()  # another encoder, another folder


def test_rank_rows_sorts_by_score_and_keeps_the_pretrained_rank():
    photos = [("a.jpg", "1"), ("b.jpg", "2"), ("c.jpg", "3")]
    rows = rank_rows(photos, {"1": 0.2, "2": 0.9, "3": 0.2}, {"1": 0.7, "2": 0.1, "3": 0.5})
    assert [(r["path"], r["rank"], r["pretrained_rank"]) for r in rows] == [
        ("b.jpg", 1, 3),
        ("a.jpg", 2, 1),  # tie on score: by path
        ("c.jpg", 3, 2),
    ]
