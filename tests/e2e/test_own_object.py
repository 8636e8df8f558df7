"""The lone-folder journey: a folder of a few photos of one object (with masks, and without) through the README's
`personalize run` command, as a new user runs it."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personalization.datasets import make_toy
from personalization.datasets.automask import compute_iou
from personalization.schema import decode_mask, read_image_table
from pipelines import cli

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[2] / "README.md"
# The cheapest settings that still train (the real MobileNetV2 of configs/demo.yaml, on 64 px inputs).
CHEAP = ["model.image_size=64", "train.num_triplets=16", "train.batch_size=8", "cutpaste.images_per_instance=4",
         "cutpaste.image_size=64"]  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    return make_toy(root / "toy", categories=("mug",), val_per_category=1, test_per_category=1, test_per_split=1,
                    dense_per_instance=0, size=96)  # fmt: skip


def _lone_folder(toy: Path, folder: Path, masks: bool) -> Path:
    """mug_01's three train photos in a plain folder (``masks/`` beside them when ``masks``)."""
    folder.mkdir(parents=True)
    for photo in sorted((toy / "train" / "mug_01").iterdir()):
        shutil.copy(photo, folder / photo.name)
    if masks:
        shutil.copytree(toy / "train_masks" / "mug_01", folder / "masks")
    return folder


def readme_commands() -> list[list[str]]:
    """The `personalize ...` commands of the first bash block under "## Your own object", split like a shell."""
    section = README.read_text().split("## Your own object", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("personalize ")]


def _substitute(argv: list[str], root: Path, out: Path) -> list[str]:
    swap = {"data.root": str(root), "output_dir": str(out)}
    return [f"{arg.split('=')[0]}={swap[arg.split('=')[0]]}" if arg.split("=")[0] in swap else arg for arg in argv]


def test_readme_commands_run_as_written_on_photos_without_masks(toy, tmp_path, ray_local, capsys, caplog):
    caplog.set_level(logging.INFO, logger="personalize")
    commands = readme_commands()
    assert commands and commands[0][:2] == ["personalize", "run"]
    photos = _lone_folder(toy, tmp_path / "my_mug", masks=False)
    out = tmp_path / "out"
    for argv in commands:
        assert cli.main(_substitute(argv, photos, out)[1:]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["instances"] == ["my_mug"] and summary["failed"] == {}
    assert summary["negatives"] == "stock"
    assert summary["metrics"] == {"pretrained": {}, "personalized": {}}
    assert summary["skipped"] == {"my_mug": "no test images"} and "Benchmark metrics skipped" in summary["note"]
    assert [r["file"] for r in summary["derived_masks"]] == ["000.jpg", "001.jpg", "002.jpg"]
    loss = json.loads((out / "train" / "my_mug" / "metrics.json").read_text())["loss"]
    assert len(loss) == 25 and np.mean(loss[-5:]) < np.mean(loss[:5])  # demo.yaml: 400 triplets / batch 16
    report = (out / "report.html").read_text()
    for text in ("Training loss", "Derived masks", "Benchmark metrics skipped", "Negatives: stock photos"):
        assert text in report
    # The derived masks are close to the toy's true masks (GrabCut from the central box).
    rows = read_image_table(out / "ingest" / "images.parquet", role="real_train").to_pylist()
    for row, truth in zip(rows, sorted((toy / "train_masks" / "mug_01").iterdir()), strict=True):
        assert compute_iou(decode_mask(row["mask"]), np.asarray(Image.open(truth).convert("L")) > 127) > 0.7
    assert "derived 3 mask(s) with GrabCut" in caplog.text and "000.jpg from center" in caplog.text
    capsys.readouterr()

    # `personalize evaluate` alone on this run: the note, exit 0.
    assert cli.main(["evaluate", "--config", "configs/demo.yaml", f"data.root={photos}", "data.category=mug",
                     f"output_dir={out}"]) == 0  # fmt: skip
    assert "Benchmark metrics skipped for my_mug" in capsys.readouterr().out


def test_user_masks_win_and_only_a_missing_one_is_derived(toy, tmp_path, ray_local):
    photos = _lone_folder(toy, tmp_path / "cup", masks=True)
    (photos / "masks" / "002.png").unlink()  # masks/ lacks one photo's mask
    out = tmp_path / "out"
    argv = ["run", "--config", "configs/demo.yaml", f"data.root={photos}", "data.category=mug", f"output_dir={out}"]
    assert cli.main(argv + CHEAP) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instances"] == ["cup"] and [r["file"] for r in summary["derived_masks"]] == ["002.jpg"]
    rows = read_image_table(out / "ingest" / "images.parquet").to_pylist()
    for row, stem in zip(rows, ("000", "001"), strict=False):  # ingest order: by file stem
        truth = np.asarray(Image.open(photos / "masks" / f"{stem}.png").convert("L")) > 127
        assert np.array_equal(decode_mask(row["mask"]), truth)
    assert (out / "train" / "cup" / "adapter_model.safetensors").is_file()
    assert "Derived masks" in (out / "report.html").read_text()


def test_no_negatives_stops_before_any_work(toy, tmp_path, capsys):
    photos = _lone_folder(toy, tmp_path / "my_mug", masks=True)
    base = ["--config", "configs/demo.yaml", f"data.root={photos}", "data.category=mug", "train.stock_negatives=false"]
    for command in ("run", "train"):
        out = tmp_path / command
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, *base, f"output_dir={out}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "train.negatives=auto found no negatives for ['my_mug']" in err
        assert "train.negatives_dir=DIR, a folder of photos that do not show your object" in err
        assert not (out / "ingest").exists() and not (out / "train").exists()
