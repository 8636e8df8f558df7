"""Outputs stay whole: a resubmitted job over the same folder, a crashed earlier build, an unwritable output folder
and a full disk. Through the real CLI (`pipelines.cli.main`), on the toy dataset and local Ray."""

import os
import subprocess

import pytest

from personalization.artifacts import read_manifest
from personalization.schema import read_image_table
from pipelines import cli


def _main(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err


def _leftovers(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*tmp-*"))


def _state(folder):
    """{instance: (shard names, manifest mtime)} over the per-instance units of a stage folder."""
    return {
        unit.name: (sorted(p.name for p in unit.glob("*.parquet")), (unit / "_manifest.json").stat().st_mtime_ns)
        for unit in sorted(folder.iterdir())
        if unit.is_dir() and not unit.name.startswith(".")
    }


def test_resubmitted_job_adds_no_duplicates_and_leaves_nothing_partial(ray_local, toy, tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"data.root={toy}", f"output_dir={out}", "cutpaste.image_size=48"]
    for stage in ("ingest", "cutpaste"):
        assert _main(capsys, stage, *args, "cutpaste.images_per_instance=4")[0] == 0
    folder = out / "cutpaste"
    first = _state(folder)
    instances = len(read_image_table(out / "ingest", columns=["instance_id"]).column("instance_id").unique())
    assert len(first) == instances

    # The same job again: skipped, byte for byte.
    assert _main(capsys, "cutpaste", *args, "cutpaste.images_per_instance=4")[0] == 0
    assert _state(folder) == first

    # A crashed earlier build left a temp folder with a shard in it; the job is resubmitted with other settings.
    unit = sorted(first)[0]
    crashed = folder / f".{unit}.tmp-crashed"
    crashed.mkdir()
    (crashed / "part-0.parquet").write_bytes(b"half a shard")
    assert _main(capsys, "cutpaste", *args, "cutpaste.images_per_instance=6")[0] == 0
    table = read_image_table(folder)
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 6 * instances == sum(read_manifest(folder / i)["rows"] for i in first)
    assert _leftovers(out) == []

    # A committed folder that lost its manifest (killed between rename and manifest) is redone, not trusted.
    (folder / unit / "_manifest.json").unlink()
    assert _main(capsys, "cutpaste", *args, "cutpaste.images_per_instance=6")[0] == 0
    again = read_image_table(folder)
    assert sorted(again["image_id"].to_pylist()) == sorted(ids) and read_manifest(folder / unit)["rows"] == 6
    assert _leftovers(out) == []


def test_output_folder_that_cannot_be_created(toy, tmp_path, capsys):
    """As root, chmod does not block writes: an output_dir under a regular file fails for everyone."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder")
    code, err = _main(capsys, "ingest", f"data.root={toy}", f"output_dir={blocker / 'out'}")
    assert code == 2, err
    assert "results.txt" in err and "output_dir" in err and "Traceback" not in err
    assert blocker.read_text() == "a file, not a folder"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): no disk-full test")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_fails_clearly_and_commits_nothing(toy, tiny_disk, capsys):
    filler = tiny_disk / "filler"
    stats = os.statvfs(tiny_disk)
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 8192))  # leave 8 KiB: the ingest table needs more
    out = tiny_disk / "out"
    code, err = _main(capsys, "ingest", f"data.root={toy}", f"output_dir={out}")
    assert code == 2, err
    assert "No space left" in err and "Traceback" not in err
    assert not (out / "ingest").exists() and _leftovers(tiny_disk) == []
    os.unlink(filler)  # with space again, the same command succeeds
    assert _main(capsys, "ingest", f"data.root={toy}", f"output_dir={out}")[0] == 0
    assert read_manifest(out / "ingest")["rows"] > 0
