"""The bad-input corpus, through the real CLI (`pipelines.cli.main`), as a user meets it.

Every broken input is either handled correctly (exit 0, the row as it should be) or rejected before any work with
exit status 2 and a message on stderr naming the file (or field) and the fix, never a traceback. The corpus is
built here from code (no committed binaries). The image loaders' details are unit-tested in
tests/unit/test_images.py and tests/unit/test_layouts.py; this is the user-level check of the same promises.
"""

import io
import json
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personalization.schema import decode_image, decode_mask, read_image_table
from pipelines import cli

SIDE = 32


def _png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _photo(seed: int = 0, size=(SIDE, SIDE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(side: int = 20000) -> bytes:
    """A 60-byte PNG whose header claims side x side RGB (1.2 GB decoded) - nothing that big is ever allocated."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0")) + _chunk(b"IEND", b"")


def _ingest(capsys, root, out, *extra):
    """`personalize ingest` on a plain folder of photos -> (exit code, stdout, stderr)."""
    argv = ["ingest", f"data.root={root}", "data.category=mug", "data.instance_id=mug_0", f"output_dir={out}", *extra]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, Image.Image):
        payload.save(path)
    else:
        path.write_bytes(payload)


def _saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _truncated(fmt):
    data = _saved(_photo(1), fmt)
    return data[: len(data) // 2]


# name -> (files to add beside one good photo `good.png`, text the error must contain)
REJECTED = {
    "truncated_png": ({"cut.png": _truncated("PNG")}, "cut.png"),
    "truncated_jpeg": ({"cut.jpg": _truncated("JPEG")}, "cut.jpg"),
    "zero_byte": ({"empty.jpg": b""}, "empty.jpg"),
    "not_an_image": ({"notes.jpg": b"these are my notes, not a photo\n"}, "notes.jpg"),
    "huge_20000px": ({"huge.png": _bomb_png()}, "huge.png: image is too large"),
    "mask_wrong_size": ({"masks/good.png": Image.new("L", (SIDE // 2, SIDE // 2), 255)}, "masks/good.png"),
    "mask_all_zero": ({"masks/good.png": Image.new("L", (SIDE, SIDE), 0)}, "masks/good.png"),
    "duplicate_stems": ({"twin.png": _photo(2), "twin.jpg": _photo(3)}, "twin"),
    # Issue 11, part 4: only photo formats are decoded, within data.max_pixels, and names are matched exactly.
    "eps_renamed_jpg": (
        {"scan.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"},
        "scan.jpg: not a readable image in a photo format (it is PostScript/EPS;",
    ),
    "gif_photo": ({"clip.gif": _saved(_photo(8), "GIF")}, "clip.gif: GIF files are not read"),
    "over_pixel_limit": ({"big.png": _photo(9, size=(64, 64))}, "big.png: image is too large: 4,096 pixels"),
    "mask_stem_nfd": (
        {"café.png": _photo(10), "masks/cafe\u0301.png": Image.new("L", (SIDE, SIDE), 255)},
        "masks/cafe\u0301.png: pairs with no image, but its stem differs from image 'café.png' only in Unicode "
        "normalisation (the mask's name is NFD, the image's NFC",
    ),
    "mask_stem_case": (
        {"masks/GOOD.png": Image.new("L", (SIDE, SIDE), 255)},
        "masks/GOOD.png: pairs with no image, but its stem differs from image 'good.png' only in letter case; "
        "rename the mask to 'good.png'",
    ),
}
EXTRA_ARGS = {"over_pixel_limit": ("data.max_pixels=2000",)}  # good.png has 1024 pixels, big.png 4096


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_broken_input_is_rejected_with_the_file_and_the_fix(case, tmp_path, capsys):
    files, named = REJECTED[case]
    root = tmp_path / "photos"
    _write(root / "good.png", _photo())
    for name, payload in files.items():
        _write(root / name, payload)
    code, _, err = _ingest(capsys, root, tmp_path / "out", *EXTRA_ARGS.get(case, ()))
    assert code == 2, err
    assert named in err and "Traceback" not in err
    assert any(hint in err for hint in ("remove", "re-copy", "re-export", "re-make", "rename", "fix", "downscale"))
    if case == "over_pixel_limit":
        assert "data.max_pixels=2000" in err and "raise data.max_pixels" in err
    assert not (tmp_path / "out" / "ingest").exists(), "a rejected dataset left a partial ingest folder"
    assert not list((tmp_path / "out").glob(".ingest.tmp-*"))


def test_symlink_out_of_the_dataset_root_is_rejected(tmp_path, capsys):
    root = tmp_path / "photos"
    _write(root / "good.png", _photo())
    _write(tmp_path / "elsewhere" / "secret.png", _photo(4))
    (root / "linked.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    code, _, err = _ingest(capsys, root, tmp_path / "out")
    assert code == 2 and "linked.png" in err and "outside the dataset root" in err and "Traceback" not in err


def test_odd_but_valid_photos_are_read_correctly(tmp_path, capsys):
    """1x1, CMYK, palette, 16-bit, EXIF-rotated, a unicode name, a 20000 px wide strip, HEIC, AVIF: all ingested,
    as RGB."""
    import pillow_heif

    pillow_heif.register_heif_opener()  # to write the HEIC here; ingest registers it for reading by itself
    root = tmp_path / "photos"
    _write(root / "iphone.heic", _photo(11, size=(36, 24)))
    _write(root / "web.avif", _photo(12, size=(28, 20)))
    _write(root / "tiny.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)).save(root / "cmyk.jpg", format="JPEG")
    _write(root / "palette.png", _photo(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=8))
    _write(root / "deep.png", Image.fromarray(np.full((SIDE, SIDE), 40000, np.uint16)))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise (portrait)
    _photo(6, size=(40, 20)).save(root / "rotated.jpg", format="JPEG", exif=exif)
    _write(root / "masks" / "rotated.png", Image.new("L", (40, 20), 255))  # masks follow the photo's EXIF
    _write(root / "tasse_café_杯.png", _photo(7))
    _write(root / "strip.png", Image.new("RGB", (20000, 2), (0, 0, 255)))
    code, out_text, err = _ingest(capsys, root, tmp_path / "out", "data.max_side=1024")
    assert code == 0, err
    rows = {os.path.splitext(r["image_id"])[0]: r for r in read_image_table(tmp_path / "out" / "ingest").to_pylist()}
    assert len(rows) == 9, sorted(rows)
    by_size = {(r["width"], r["height"]) for r in rows.values()}
    assert (1, 1) in by_size and (20, 40) in by_size and (1024, 1) in by_size  # rotated upright; strip downscaled
    assert (36, 24) in by_size and (28, 20) in by_size  # HEIC, AVIF
    for row in rows.values():
        image = decode_image(row["image"])
        assert image.mode == "RGB" and image.size == (row["width"], row["height"])
        if row["mask"] is not None:
            assert decode_mask(row["mask"]).shape == (row["height"], row["width"])
    names = [json.dumps(r["image_id"], ensure_ascii=False) for r in rows.values()]
    assert len(names) == 9


def test_coloured_mask_is_read_as_the_object(tmp_path, capsys):
    """A red label on black (as annotation tools export) is the object, not background."""
    root = tmp_path / "photos"
    _write(root / "good.png", _photo())
    label = np.zeros((SIDE, SIDE, 3), np.uint8)
    label[4:20, 6:26] = (255, 0, 0)
    _write(root / "masks" / "good.png", Image.fromarray(label))
    code, _, err = _ingest(capsys, root, tmp_path / "out")
    assert code == 0, err
    (row,) = read_image_table(tmp_path / "out" / "ingest").to_pylist()
    np.testing.assert_array_equal(decode_mask(row["mask"]), label[..., 0] > 0)


def _ingest_as_nobody(root: Path, out: Path, log: Path) -> int:
    """`personalize ingest` in a forked child that dropped root to uid/gid 65534 (stderr to ``log``); its exit code."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            sys.stderr = open(log, "w")  # noqa: SIM115 - closed by the child's exit
            os.setgid(65534)
            os.setuid(65534)
            argv = ["ingest", f"data.root={root}", "data.category=mug", "data.instance_id=mug_0", f"output_dir={out}"]
            try:
                code = cli.main(argv)
            except SystemExit as exit_:
                code = exit_.code
        finally:
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_unreadable_photo_is_reported_as_permission_denied(tmp_path, capsys):
    """chmod 000 photo: exit 2, "permission denied" and the chmod fix, not "corrupt". As root (where chmod blocks
    nothing) the command runs in a child that dropped to an unprivileged user, in a folder that user may enter."""
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp()) if as_root else tmp_path
    try:
        base.chmod(0o777)
        root = base / "photos"
        _write(root / "good.png", _photo())
        _write(root / "locked.png", _photo(13))
        root.chmod(0o755)
        (root / "locked.png").chmod(0)
        if as_root:
            code = _ingest_as_nobody(root, base / "out", base / "stderr.txt")
            err = (base / "stderr.txt").read_text()
        else:
            code, _, err = _ingest(capsys, root, base / "out")
        assert code == 2, err
        assert "locked.png: cannot read image: permission denied; fix with `chmod a+r" in err
        assert "corrupt" not in err and "Traceback" not in err
    finally:
        (base / "photos" / "locked.png").chmod(0o644)
        if as_root:
            shutil.rmtree(base)


def test_config_with_wrong_types_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: two\n")
    code, _, err = _ingest(capsys, tmp_path, tmp_path / "out", "--config", str(bad))
    assert code == 2 and "train.epochs" in err and "Traceback" not in err
    bad.write_text("train: [not, a, mapping]\n")
    code, _, err = _ingest(capsys, tmp_path, tmp_path / "out", "--config", str(bad))
    assert code == 2 and "train" in err and "Traceback" not in err
    bad.write_text("train: {epochs: 1\n")  # not YAML at all
    code, _, err = _ingest(capsys, tmp_path, tmp_path / "out", "--config", str(bad))
    assert code == 2 and "bad.yaml" in err and "Traceback" not in err
    code, _, err = _ingest(capsys, tmp_path, tmp_path / "out", "train.batch_size=-4")
    assert code == 2 and "train.batch_size" in err and "Traceback" not in err


def test_prompt_file_that_is_not_json_is_rejected(tmp_path, capsys, zoo):
    """`personalize generate` with a broken prompt file: exit 2 naming the file, before any generation."""
    import shutil

    out = tmp_path / "out"
    (out / "ingest").mkdir(parents=True)
    (out / "ingest" / "instances.json").write_text(json.dumps({"mug_1": {"category": "mug", "split": "test"}}))
    shutil.copytree(zoo["stable_diffusion"], out / "dreambooth" / "mug_1")
    prompts = tmp_path / "prompts.json"
    prompts.write_text("mug_1: a <new1> mug on a table\n")
    argv = [
        "generate", f"output_dir={out}", f"dreambooth.base_model={zoo['stable_diffusion']}", "generate.enabled=true",
        f"generate.prompts_file={prompts}", "generate.negatives_per_category=0", "filter.enabled=false",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "prompts.json" in err and "Traceback" not in err
    assert not (out / "generate" / "positives").exists()
