"""`personalize find` through `pipelines.cli.main` on a small real run (toy benchmark, MobileNetV2, a few steps).

One local Ray for the module (train and both find runs share it): results.csv, index.html, skipped.csv, and the
embedding cache that makes a re-run on a grown gallery embed only the new photos.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil

import pytest

from personalization import load_encoder
from personalization.datasets import make_toy
from pipelines import cli

pytestmark = pytest.mark.slow
CHEAP = ["model.image_size=64", "train.num_triplets=16", "train.batch_size=8", "cutpaste.images_per_instance=4",
         "cutpaste.image_size=64", "ray.num_cpus=2", "ray.dashboard=false"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    """A PODS-layout toy (mug_01 to find; mug_00 a val instance) ingested, composited and trained for 2 steps."""
    root = tmp_path_factory.mktemp("find")
    toy = make_toy(root / "toy", categories=("mug", "tote"), val_per_category=1, test_per_category=1,
                   test_per_split=2, dense_per_instance=0, size=96)  # fmt: skip
    common = ["--config", "configs/demo.yaml", f"data.root={toy}", f"output_dir={root / 'out'}", *CHEAP,
              "data.instances=[mug_01]"]  # fmt: skip
    for stage in ("ingest", "cutpaste", "train"):
        assert cli.main([stage, *common]) == 0
    return root, toy, common


def _gallery(toy, folder):
    """Every toy test photo (the object's held-back photos among the other instances'), plus a corrupt file."""
    shutil.copytree(toy / "test", folder)
    (folder / "mug_00" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    return folder


def _results(out, instance="mug_01"):
    with open(out / "find" / instance / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_find_ranks_writes_the_page_and_embeds_only_new_photos_again(trained, caplog):
    caplog.set_level(logging.INFO, logger="personalize")
    root, toy, common = trained
    out, gallery = root / "out", _gallery(toy, root / "gallery")
    argv = ["find", *common, f"find.gallery={gallery}", "find.top_k=5", "find.batch_size=8"]
    assert cli.main(argv) == 0

    rows = _results(out)
    photos = sorted(p for p in gallery.rglob("*.jpg") if p.name != "corrupt.jpg")
    assert list(rows[0]) == ["rank", "path", "score", "pretrained_score", "pretrained_rank", "sha256"]
    assert sorted(row["path"] for row in rows) == [str(p) for p in photos]
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores, reverse=True) and [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert sorted(int(row["pretrained_rank"]) for row in rows) == list(range(1, len(rows) + 1))
    # the scores are the library's: the same photo scored through load_encoder (no Ray) agrees
    encoder = load_encoder(out / "train" / "mug_01")
    top = rows[0]["path"]
    assert encoder.score([top])[0] == pytest.approx(float(rows[0]["score"]), abs=1e-5)
    assert encoder.pretrained().score([top])[0] == pytest.approx(float(rows[0]["pretrained_score"]), abs=1e-5)
    own = [float(r["score"]) for r in rows if "/mug_01/" in r["path"]]
    others = [float(r["score"]) for r in rows if "/mug_01/" not in r["path"]]
    assert sum(own) / len(own) > sum(others) / len(others)  # the object's held-back photos score higher

    page = (out / "find" / "mug_01" / "index.html").read_text()
    for row in rows[:5]:
        name = row["path"].rsplit("/", 1)[1]
        assert f'title="{row["path"]}"' in page and name in page
    assert page.count("data:image/jpeg;base64") >= 5
    with open(out / "find" / "mug_01" / "skipped.csv") as handle:
        skipped = list(csv.DictReader(handle))
    assert [row["path"] for row in skipped] == [str(gallery / "mug_00" / "corrupt.jpg")]
    assert "corrupt.jpg" in skipped[0]["reason"]
    summary = json.loads((out / "find" / "mug_01" / "summary.json").read_text())
    assert summary["embedded"] == {"personalized": len(photos), "pretrained": len(photos)}
    assert f"open {out / 'find' / 'mug_01' / 'index.html'}" in caplog.text

    for k, photo in enumerate(photos[:2]):  # two new files: a copy under a new name is not new, so alter bytes
        (gallery / f"new_{k}.jpg").write_bytes(photo.read_bytes() + b"\0" * (k + 1))
    assert cli.main([*argv, "find.localize=true"]) == 0  # the re-run also locates the object in the top 5
    summary = json.loads((out / "find" / "mug_01" / "summary.json").read_text())
    assert summary["embedded"] == {"personalized": 2, "pretrained": 2}
    assert summary["photos"] == len(photos) + 2
    again = _results(out)
    scores = {row["path"]: row["score"] for row in again}
    assert all(scores[row["path"]] == row["score"] for row in rows)  # cached photos keep their exact scores
    located = [row for row in again if row["box"]]
    assert 1 <= len(located) == summary["located"] <= 5 and all(int(row["rank"]) <= 5 for row in located)
    for row in located:
        x0, y0, x1, y1 = map(float, row["box"].split(","))
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and (out / "find" / "mug_01" / row["mask"]).is_file()


def test_find_names_what_is_missing(trained, capsys, tmp_path):
    root, toy, common = trained
    for extra, message in [
        ([], "find.gallery: pass find.gallery=DIR"),
        ([f"find.gallery={tmp_path}", "data.instances=[tote_01]"], "no personalized encoder for ['tote_01']"),
        ([f"find.gallery={tmp_path}"], f"find.gallery={tmp_path}: no photos found"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["find", *common, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
