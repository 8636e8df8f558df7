"""The driver of `personalize run` SIGKILLed mid-train, then started again over the same output folder.

Promises: finished stages are skipped by manifest (their manifests untouched), the interrupted stage's leftovers
are cleaned and the stage redone (resuming from its last Ray Train checkpoint), and every output equals an
uninterrupted run's. The killed driver's local Ray is then killed by PID (its process tree), nothing else.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
from safetensors.torch import load_file

from personalization.schema import read_image_table

DRIVER = Path(__file__).with_name("driver.py")
STAGES = ("ingest", "cutpaste/mug_01")  # finished before train starts (cutpaste commits per instance)


def _command(hold: Path, out: Path, toy: Path, zoo: dict) -> list[str]:
    return [
        sys.executable, str(DRIVER), str(hold), "run",
        f"data.root={toy}", f"output_dir={out}", "ray.num_cpus=2",
        "model.backbone=dinov2_vitb14", f"model.weights={zoo['dinov2']}", "model.image_size=28",
        "train.num_triplets=16", "train.batch_size=4", "train.epochs=1", "train.checkpoint_every=2",
        "cutpaste.images_per_instance=4", "cutpaste.image_size=48",
        "evaluate.tasks=[classification,retrieval]", "evaluate.dense_image_size=28",
    ]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _run(command: list[str], log: Path) -> None:
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=_env(), timeout=480)
    assert done.returncode == 0, log.read_text()[-3000:]


def _wait_for(predicate, what: str, process: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"the driver exited before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _registered_checkpoint(out: Path) -> bool:
    """Ray Train's controller has registered a checkpoint (it polls workers every 2 s; until then it can be lost)."""
    for snapshot in (out / "train" / ".ray").rglob("checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except json.JSONDecodeError:
            pass
    return False


def _manifests(out: Path) -> dict[str, tuple[bytes, int]]:
    files = {stage: out / stage / "_manifest.json" for stage in STAGES}
    return {stage: (path.read_bytes(), path.stat().st_mtime_ns) for stage, path in files.items()}


@pytest.mark.slow
def test_driver_killed_mid_train_then_restarted(tmp_path, toy, zoo):
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()
    command = _command(hold, out, toy, zoo)
    log = tmp_path / "killed.log"
    with log.open("w") as handle:
        driver = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_env())
    try:
        # The worker holds at step 3 while `hold` exists, so the kill lands after the step-2 checkpoint.
        _wait_for(lambda: _registered_checkpoint(out), "the first train checkpoint", driver, log)
        tree = faults.process_tree(driver.pid)  # the driver, its local Ray, the Train controller and workers
        driver.kill()  # SIGKILL: no cleanup, no atexit, no ray.shutdown
        driver.wait(timeout=30)
        faults.kill_tree(tree[1:])  # what the dead driver left running: its Ray, found by PID
    finally:
        if driver.poll() is None:
            faults.kill_tree(faults.process_tree(driver.pid))
    assert driver.returncode == -9
    assert not [p.pid for p in tree if faults.alive(p)], "processes of the killed run remain"
    assert list((out / "train").glob(".mug_01.tmp-*")), "expected the interrupted train build folder"
    assert not (out / "train" / "mug_01" / "_manifest.json").exists()
    before = _manifests(out)

    hold.unlink()
    _run(command, tmp_path / "restarted.log")
    assert _manifests(out) == before, "a finished stage was redone"
    assert not [p for p in out.rglob(".*tmp-*")], "leftovers of the interrupted run remain"
    resumed = json.loads((out / "train" / "mug_01" / "metrics.json").read_text())
    assert resumed["start_step"] == 2 and resumed["steps"] == 4  # continued from the checkpoint at step 2

    reference = tmp_path / "reference"
    _run(_command(hold, reference, toy, zoo), tmp_path / "reference.log")
    assert json.loads((reference / "train" / "mug_01" / "metrics.json").read_text())["loss"] == resumed["loss"]
    for stage in STAGES:
        ids = sorted(read_image_table(out / stage, columns=["image_id"])["image_id"].to_pylist())
        assert ids == sorted(read_image_table(reference / stage, columns=["image_id"])["image_id"].to_pylist())
    adapter, reference_adapter = (
        load_file(o / "train" / "mug_01" / "adapter_model.safetensors") for o in (out, reference)
    )
    assert adapter.keys() == reference_adapter.keys()
    assert all((adapter[k] == reference_adapter[k]).all() for k in adapter)
    metrics, reference_metrics = (json.loads((o / "summary.json").read_text())["metrics"] for o in (out, reference))
    assert metrics == reference_metrics
