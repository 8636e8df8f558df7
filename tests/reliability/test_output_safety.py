"""Nothing escapes the output folder, two runs never share one, and small files are never half-written.

Each test attacks through the public entry points (``cli.main``, the stage helpers) and asserts on what is left
on disk and on the exit code and message the user gets.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from personalization.artifacts import commit_stage, input_hash, write_json_atomic
from personalization.config import load_config
from personalization.errors import OutputPathError, UserError
from personalization.output_lock import LOCK_FILE, OutputDirInUse, hold_output_lock
from personalization.paths import check_name, inside, slugify
from pipelines import cli
from pipelines.common import stage_dir, stage_main
from pipelines.instances import read_failures, write_failures


def _copy_toy(toy, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy, root)
    return root, json.loads((root / "pods_info.json").read_text())


@pytest.mark.parametrize(
    "category",
    ["../../victim", "/VICTIM", "a/b", "..", ".hidden", 7, ["mug"], "mug\x00", "x" * 200],
    ids=["dotdot", "absolute", "separator", "parent", "hidden", "int", "list", "nul", "long"],
)
def test_dataset_category_that_would_leave_output_dir_is_refused_at_ingest(toy, tmp_path, capsys, category):
    root, info = _copy_toy(toy, tmp_path)
    victim = tmp_path / "victim"
    (victim / "keep.txt").parent.mkdir()
    (victim / "keep.txt").write_text("precious")
    if category == "/VICTIM":
        category = str(victim)
    instance = info["classes"][0]
    info["class_to_sc"][instance] = category
    (root / "pods_info.json").write_text(json.dumps(info))
    out = tmp_path / "out" / "a" / "b"
    code = _exit_code(cli.main, ["ingest", f"data.root={root}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pods_info.json" in err and "class_to_sc" in err and "cannot name an output folder" in err
    assert (victim / "keep.txt").read_text() == "precious"
    assert not (out / "ingest").exists()


def test_instance_id_that_is_an_absolute_path_is_refused(toy, tmp_path, capsys):
    root, info = _copy_toy(toy, tmp_path)
    evil = str(root / "train")
    info["classes"].append(evil)
    info["class_to_sc"][evil] = "mug"
    info["class_to_split"][evil] = "test"
    (root / "pods_info.json").write_text(json.dumps(info))
    code = _exit_code(cli.main, ["ingest", f"data.root={root}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "classes[" in err and "cannot name an output folder" in err
    assert (root / "train").is_dir()


def test_stage_paths_cannot_step_outside_output_dir(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}"])
    assert stage_dir(cfg, "train", "mug_1") == tmp_path / "out" / "train" / "mug_1"
    for part in ("..", "../x", "/etc", "", ".", "a/b"):
        with pytest.raises(OutputPathError, match="cannot be part of an output path"):
            stage_dir(cfg, "generate", "negatives", part)
    with pytest.raises(OutputPathError):
        inside(tmp_path, "train", "..")


def test_names_rule_and_folder_slug():
    assert check_name("water bottle", "c") == "water bottle"
    for bad in ("", " mug", "mug.", "a..b", "é", "a\\b"):
        with pytest.raises(OutputPathError):
            check_name(bad, "c")
    assert slugify("My Mug (2024)!") == "My Mug _2024"
    assert slugify("...") == "object"


def test_folder_layout_names_its_instance_after_a_safe_slug_of_the_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from personalization.datasets.layouts import scan_dataset

    root = tmp_path / "My Mug (2)"
    root.mkdir()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(root / "a.jpg")
    scan = scan_dataset(root, category="mug")
    assert list(scan.instances) == ["My Mug _2"] and not scan.errors
    scan = scan_dataset(root, category="mug", instance_id="../evil")
    assert not scan.instances and "data.instance_id='../evil' cannot name an output folder" in scan.errors.errors[0]


def _hold_lock_in_child(out, ready):
    code = (
        "import sys, time\n"
        "from personalization.output_lock import hold_output_lock\n"
        f"with hold_output_lock({str(out)!r}):\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, "personalize", "run"])
    for _ in range(300):
        if ready.exists():
            return child
        time.sleep(0.05)
    child.kill()
    raise AssertionError("the child never took the lock")


def test_second_run_on_the_same_output_dir_stops_at_once_naming_the_first(tmp_path, capsys):
    out = tmp_path / "out"
    child = _hold_lock_in_child(out, tmp_path / "ready")
    try:
        ran = []
        started = time.time()
        code = _exit_code(stage_main, "ingest", lambda cfg: ran.append(cfg) or out, [f"output_dir={out}"])
        err = capsys.readouterr().err
        assert code == 2 and not ran and time.time() - started < 10
        assert f"pid {child.pid}" in err and "in use" in err and "output_dir=DIR" in err
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The holder died without cleaning up: its lock is taken over, and the file now names this process.
    with hold_output_lock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        with hold_output_lock(out):  # re-entrant in one process: `run` holds it, its stages take it again
            pass
    assert (out / LOCK_FILE).read_text() == ""


def test_lock_error_is_a_user_error():
    assert issubclass(OutputDirInUse, UserError)


def test_user_errors_exit_2_and_bugs_keep_their_traceback(tmp_path, capsys):
    def user_mistake(cfg):
        raise UserError("data.root: pass data.root=DIR")

    def bug(cfg):
        raise ValueError("an internal invariant broke")

    assert _exit_code(stage_main, "ingest", user_mistake, [f"output_dir={tmp_path}"]) == 2
    assert "error: data.root: pass data.root=DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="internal invariant"):  # main() lets it through: traceback, exit 1
        stage_main("ingest", bug, [f"output_dir={tmp_path}"])
    script = (
        "from pipelines.common import stage_main\ndef bug(cfg): raise KeyError('oops')\nstage_main('ingest', bug, [])"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError: 'oops'" in done.stderr


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("data.instance_id=0123", "instance_id", "0123"),
        ("data.category=1.10", "category", "1.10"),
        ("data.category=yes", "category", "yes"),
        ("data.category=2024-01-01", "category", "2024-01-01"),
        ("data.instances=[007, 1e3]", "instances", ("007", "1e3")),
        ("data.instances=007", "instances", ("007",)),
    ],
)
def test_string_fields_keep_the_text_typed(override, field, expected):
    assert getattr(load_config(None, [override]).data, field) == expected


def test_typed_fields_still_read_yaml_values(tmp_path):
    cfg = load_config(None, ["train.epochs=0x10", "train.learning_rate=1e-3", "dreambooth.mixed_precision=no"])
    assert (cfg.train.epochs, cfg.train.learning_rate, cfg.dreambooth.mixed_precision) == (16, 1e-3, "no")
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  category: 1.10\n  instances: [007]\n")
    assert load_config(config).data.category == "1.10" and load_config(config).data.instances == ("007",)


def test_failures_of_instances_outside_the_selection_are_kept(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    write_failures(cfg, "train", {"a": "RuntimeError: oom", "b": "RuntimeError: nan"}, selected=["a", "b"])
    write_failures(cfg, "train", {}, selected=["a"])  # `a` alone was re-run and now passes
    assert read_failures(cfg, ["train"]) == {"b": {"stage": "train", "error": "RuntimeError: nan"}}
    write_failures(cfg, "train", {}, selected=["b"])
    assert not stage_dir(cfg, "train", "failures.json").exists()
    assert not list(stage_dir(cfg, "train").glob(".*tmp"))


def test_atomic_write_leaves_the_old_file_when_it_fails(tmp_path):
    path = write_json_atomic(tmp_path / "summary.json", {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_hidden_scratch_does_not_change_a_folder_hash(tmp_path):
    folder = tmp_path / "generate"
    commit_stage(folder / "negatives" / "mug", "generate/negatives", {"n": 1}, lambda tmp: (tmp / "x").write_text("1"))
    before = input_hash(folder)
    (folder / ".negatives-scratch-123").mkdir()
    (folder / ".negatives-scratch-123" / "part.parquet").write_text("half-written")
    (folder / LOCK_FILE).write_text("{}")
    assert input_hash(folder) == before


def _exit_code(function, *args):
    try:
        return int(function(*args) or 0)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
