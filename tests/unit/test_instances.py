"""pipelines.instances: per-instance work packed into the cluster, failures kept to their instance."""

from __future__ import annotations

import json
import threading
import time

import pytest

from personalization.config import build_config
from pipelines.instances import (
    FAILURES,
    describe,
    read_failures,
    run_each,
    without_failed,
)
from pipelines.stages import per_instance_before


def _cfg(tmp_path, **overrides):
    return build_config({"output_dir": str(tmp_path / "out"), **overrides})


def test_run_each_packs_work_and_keeps_failures_to_their_instance(tmp_path, capsys):
    cfg = _cfg(tmp_path, ray={"max_concurrent": 2})
    lock, active, peak, done = threading.Lock(), [0], [0], []

    def work(instance_id):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        if instance_id == "mug_2":
            raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")
        done.append(instance_id)

    failures = run_each(cfg, "train", ["mug_1", "mug_2", "mug_3", "mug_4"], work, per_run={"CPU": 1})
    assert failures == {"mug_2": "RuntimeError: Tried to allocate 2 GiB"}
    assert sorted(done) == ["mug_1", "mug_3", "mug_4"]  # the others went on
    assert peak[0] == 2  # two at a time, never more
    path = tmp_path / "out" / "train" / FAILURES
    assert json.loads(path.read_text()) == failures
    assert "[train] 4/4 instances done (1 failed)" in capsys.readouterr().out

    assert run_each(cfg, "train", ["mug_2"], lambda i: None, per_run={"CPU": 1}) == {}
    assert not path.exists()  # the retry succeeded: no stale failure is left behind


def test_interrupts_are_not_instance_failures(tmp_path):
    cfg = _cfg(tmp_path, ray={"max_concurrent": 1})

    def work(instance_id):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_each(cfg, "train", ["mug_1", "mug_2"], work, per_run={"CPU": 1})


def test_ctrl_c_returns_at_once_and_starts_nothing_more(tmp_path):
    """A Ctrl-C while fits run: run_each raises at once, queued instances never start, and the running fit's
    error (as when Ray shuts down under it) is not recorded as a failure."""
    import signal

    cfg = _cfg(tmp_path, ray={"max_concurrent": 1})
    release, started = threading.Event(), []

    def work(instance_id):
        started.append(instance_id)
        time.sleep(0.5)  # the driver is waiting on the running fits by then
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # the user's Ctrl-C
        release.wait(30)
        raise RuntimeError("the Train run died with the driver's Ray")

    begun = time.monotonic()
    # Python's own Ctrl-C handler, as in `personalize`: an earlier test's Ray Tune run leaves its own in the process
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_each(cfg, "train", ["mug_1", "mug_2", "mug_3"], work, per_run={"CPU": 1})
    finally:
        signal.signal(signal.SIGINT, before)
    assert time.monotonic() - begun < 10  # did not wait for the running fit (30 s)
    release.set()
    time.sleep(0.5)
    assert started == ["mug_1"]
    assert not (tmp_path / "out" / "train" / FAILURES).exists()


def test_later_stages_leave_out_what_failed_upstream(tmp_path, caplog):
    cfg = _cfg(tmp_path, dreambooth={"enabled": True}, generate={"enabled": True})
    (tmp_path / "out" / "dreambooth").mkdir(parents=True)
    (tmp_path / "out" / "dreambooth" / FAILURES).write_text(json.dumps({"mug_1": "RuntimeError: diverged"}))
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / FAILURES).write_text(json.dumps({"mug_2": "RuntimeError: oom"}))

    assert per_instance_before(cfg, "generate") == ["dreambooth"]
    assert per_instance_before(cfg, "evaluate") == ["dreambooth", "train"]
    assert without_failed(cfg, "dreambooth", ["mug_1", "mug_2", "mug_3"]) == ["mug_1", "mug_2", "mug_3"]
    assert without_failed(cfg, "generate", ["mug_1", "mug_2", "mug_3"]) == ["mug_2", "mug_3"]
    assert without_failed(cfg, "train", ["mug_1", "mug_2", "mug_3"]) == ["mug_2", "mug_3"]  # train retries mug_2
    assert without_failed(cfg, "evaluate", ["mug_1", "mug_2", "mug_3"]) == ["mug_3"]
    assert "mug_1 is left out: it failed in dreambooth" in caplog.text
    assert read_failures(cfg) == {
        "mug_1": {"stage": "dreambooth", "error": "RuntimeError: diverged"},
        "mug_2": {"stage": "train", "error": "RuntimeError: oom"},
    }
    with pytest.raises(RuntimeError, match="every selected instance failed upstream"):
        without_failed(cfg, "evaluate", ["mug_1", "mug_2"])

    no_generation = _cfg(tmp_path)  # dreambooth off: its old failures.json no longer applies
    assert without_failed(no_generation, "evaluate", ["mug_1", "mug_2", "mug_3"]) == ["mug_1", "mug_3"]


def test_describe_names_the_workers_own_error():
    from ray.train import WorkerGroupError

    worker = RuntimeError("Traceback (most recent call last):\n  File 'x.py'\nRuntimeError: CUDA out of memory")
    wrapped = WorkerGroupError("[Rank 0 Error Snippet]: ...", {1: ValueError("later"), 0: worker})
    assert describe(wrapped) == "RuntimeError: CUDA out of memory"
    assert describe(FileNotFoundError("no adapter")) == "FileNotFoundError: no adapter"
