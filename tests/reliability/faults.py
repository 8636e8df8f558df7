"""Fault injection for the reliability suite: real processes that really die, once, in the middle of a stage.

- :func:`dying_class` wraps a Ray Data callable class (``ImageSampler``, ``Scorer``, ``EmbedActor``) so that the
  first actor process to reach its ``after``-th batch calls ``os._exit`` - a crash, not an exception, so Ray sees an
  actor death and must restart the actor and retry the batch. A marker file created with ``O_EXCL`` records the
  death, so the restarted actor (and every other one) runs normally.
- :class:`DyingModel` is a ``build_model`` for ``pipelines.train.run`` that builds the production LoRA encoder and
  makes one Ray Train worker ``os._exit`` when it starts a chosen step.
- :func:`process_tree` / :func:`kill_tree` find and SIGKILL a driver's descendants (the local Ray it started) by PID.

This module is pickled by value (``ray.cloudpickle.register_pickle_by_value``), so Ray workers need not import it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import ray.cloudpickle

EXIT_CODE = 1


def claim(marker: str | Path) -> bool:
    """True for exactly one caller across all processes: the one that creates ``marker``."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def deaths(marker: str | Path) -> int:
    """How many injected deaths happened (0 or 1): the marker holds the PID of the process that died."""
    return int(Path(marker).is_file())


def dying_class(base: type, marker: str | Path, after: int) -> type:
    """A subclass of the Ray Data callable ``base`` whose first actor to receive batch ``after + 1`` dies."""
    marker = str(marker)

    class Dying(base):
        def __call__(self, batch):
            self._fault_batches = getattr(self, "_fault_batches", 0) + 1
            if self._fault_batches > after and claim(marker):
                sys.stderr.flush()
                os._exit(EXIT_CODE)  # no cleanup, no exception: what a preempted or OOM-killed actor looks like
            return base.__call__(self, batch)

    Dying.__name__ = Dying.__qualname__ = base.__name__
    return Dying


class DyingModel:
    """``build_model`` for ``pipelines.train.run``: the production encoder; one worker dies starting step ``at_step``.

    Steps are counted per process from the step the worker starts at, so ``at_step`` counts forward calls after
    a (re)start; the marker makes the death happen once (``marker=None``: never die). ``pause_file``: while it
    exists, the worker holds at step ``at_step`` (so a test can kill the driver mid-train, at a known point).
    ``delay``: at most this many seconds the dying worker first waits for the controller to register its last
    checkpoint. Ray Train collects reported checkpoints when it polls the workers (every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s): a checkpoint reported just before a crash can be lost, and the
    run then restarts from the one before.
    """

    def __init__(
        self, marker: str | Path | None, at_step: int, *, delay: float = 0.0, pause_file: str | Path | None = None
    ) -> None:
        self.marker, self.at_step, self.delay = (str(marker) if marker else None), at_step, delay
        self.pause_file = str(pause_file) if pause_file else None

    def __call__(self, cfg):
        from pipelines.train import build_lora_encoder

        trainable = build_lora_encoder(cfg)
        calls = {"n": 0}

        def hook(module, args):
            if module.training:
                calls["n"] += 1
                if self.marker and calls["n"] == self.at_step and claim(self.marker):
                    _wait_until_registered(self.delay)
                    os._exit(EXIT_CODE)
                while self.pause_file and calls["n"] == self.at_step and os.path.exists(self.pause_file):
                    time.sleep(0.2)  # hold the worker here until the test kills the driver

        trainable.model.register_forward_pre_hook(hook)
        return trainable


def _wait_until_registered(timeout: float) -> None:
    """Wait (at most ``timeout`` s) until Ray Train's controller has registered a reported checkpoint: its
    ``checkpoint_manager_snapshot.json`` in the run folder names a latest checkpoint."""
    import json

    import ray.train

    snapshot = Path(ray.train.get_context().get_storage().experiment_fs_path, "checkpoint_manager_snapshot.json")
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every process below it (a driver's local Ray: gcs_server, raylet, workers, ...)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a killed child whose parent has not reaped it yet is gone for our purposes)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(processes: list[psutil.Process], timeout: float = 20.0) -> None:
    """SIGKILL exactly these processes (found by PID, never by name) and wait until they are gone."""
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=timeout)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
