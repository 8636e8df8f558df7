"""Many instances at once: per-instance work packed into the cluster's resources, each failure kept to its instance.

`dreambooth` and `train` fit one Ray Train run per instance. :func:`run_each` runs those fits from driver threads
(Ray Train V2 supports ``fit()`` off the main thread), as many at a time as the cluster holds
(:func:`concurrency`), and records an instance that fails in ``OUT/<stage>/failures.json`` instead of stopping the
others. Later stages leave failed instances out (:func:`without_failed`), ``personalize run`` lists them in
``summary.json`` and the report, and a re-run retries exactly them: the instances that committed are skipped.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from personalization.artifacts import hash_config, input_hash, write_json_atomic
from personalization.config import ExperimentConfig
from pipelines.common import stage_dir
from pipelines.resources import cluster_capacity
from pipelines.stages import PER_INSTANCE, per_instance_before

log = logging.getLogger("personalize.instances")

FAILURES = "failures.json"


def worker_resources(cfg: ExperimentConfig, use_gpu: bool) -> dict[str, float]:
    """What one Ray Train worker of a per-instance run asks for: a CPU, or a GPU share when instances pack."""
    return {"GPU": 1.0 / cfg.ray.instances_per_gpu} if use_gpu else {"CPU": 1.0}


def train_run_resources(cfg: ExperimentConfig, use_gpu: bool) -> dict[str, float]:
    """What one Ray Train run asks for: :func:`worker_resources` times ``train.num_workers``."""
    return {key: amount * cfg.train.num_workers for key, amount in worker_resources(cfg, use_gpu).items()}


def concurrency(cfg: ExperimentConfig, per_run: Mapping[str, float], pending: int) -> int:
    """How many per-instance runs go at once: ``ray.max_concurrent`` if set, else as many as the cluster's
    resources hold side by side, counting the nodes its autoscaler can add (at least one, at most ``pending``)."""
    if pending <= 0:
        return 0
    if cfg.ray.max_concurrent:
        return min(cfg.ray.max_concurrent, pending)
    return min(runs_that_fit(per_run), pending)


def runs_that_fit(per_run: Mapping[str, float]) -> int:
    """How many runs needing ``per_run`` each the cluster holds side by side (at least one), counting the nodes
    its autoscaler can add."""
    total = cluster_capacity()
    fits = [math.floor(total.get(key, 0.0) / need + 1e-9) for key, need in per_run.items() if need > 0]
    return max(1, min(fits, default=1))


def run_each(
    cfg: ExperimentConfig,
    stage: str,
    instance_ids: Sequence[str],
    work: Callable[[str], object],
    *,
    per_run: Mapping[str, float],
) -> dict[str, str]:
    """Run ``work(instance_id)`` for every instance, packed by :func:`concurrency`; returns {instance: error}.

    An exception in one instance's work is logged with its traceback and recorded; the others go on. The stage's
    ``failures.json`` is rewritten with this call's failures (removed when there are none). KeyboardInterrupt and
    SystemExit are not instance failures: they stop the run at once. Instances not started yet never start, and
    this returns without waiting for the running ones: the caller's Ray shutdown ends their fits, whose
    checkpoints stay for the next run to resume from (their errors are then not recorded as failures).
    """
    failures: dict[str, str] = {}
    parallel = concurrency(cfg, per_run, len(instance_ids))
    if parallel:
        log.info("%s: %d instance(s), %d at a time (%s per run)", stage, len(instance_ids), parallel, dict(per_run))
    lock, done, started, stopping = threading.Lock(), [0], time.time(), threading.Event()

    def one(instance_id: str) -> None:
        try:
            work(instance_id)
        except Exception as error:  # noqa: BLE001 - recorded per instance, re-raised below as InstanceFailures
            if stopping.is_set():  # the run was interrupted: this fit was cut short, it did not fail
                log.info("%s: %s stopped by the interrupt (%s)", stage, instance_id, describe(error))
                return
            log.error("%s: %s failed:\n%s", stage, instance_id, traceback.format_exc())
            with lock:
                failures[instance_id] = describe(error)
        with lock:
            done[0] += 1
            note = f" ({len(failures)} failed)" if failures else ""
            print(
                f"[{stage}] {done[0]}/{len(instance_ids)} instances done{note}, {time.time() - started:.0f} s",
                flush=True,
            )

    if parallel:
        pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix=f"{stage}-instance")
        try:
            for future in as_completed([pool.submit(one, i) for i in instance_ids]):
                future.result()  # only KeyboardInterrupt / SystemExit get here
        except BaseException:  # Ctrl-C (in this thread, or raised by a work): stop now, not when all are done
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    write_failures(cfg, stage, failures, selected=instance_ids)
    return failures


def describe(error: BaseException) -> str:
    """One line for the user: a Ray Train worker's own error (not the wrapper's), its last line (the message)."""
    workers = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: exception}
    if workers:
        error = workers[min(workers)]
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    name = type(getattr(error, "cause", None) or error).__name__  # a RayTaskError names its cause
    return last if last.startswith(f"{name}:") else f"{name}: {last}"


def write_failures(
    cfg: ExperimentConfig, stage: str, failures: Mapping[str, str], selected: Sequence[str] | None = None
) -> None:
    """Record this call's ``failures`` for the ``selected`` instances (all of them when None), atomically.

    Failures of instances outside the selection are kept: running one instance must not forget that another one
    failed earlier. The file is removed once no failure is left.
    """
    path = stage_dir(cfg, stage, FAILURES)
    kept = {}
    if selected is not None and path.is_file():
        kept = {i: e for i, e in json.loads(path.read_text()).items() if i not in set(selected)}
    merged = dict(sorted({**kept, **failures}.items()))
    if merged:
        write_json_atomic(path, merged)
    else:
        path.unlink(missing_ok=True)


def read_failures(cfg: ExperimentConfig, stages: Iterable[str] = PER_INSTANCE) -> dict[str, dict[str, str]]:
    """{instance: {"stage", "error"}} over ``stages``' ``failures.json`` (the first stage an instance failed in)."""
    found: dict[str, dict[str, str]] = {}
    for stage in stages:
        path = stage_dir(cfg, stage, FAILURES)
        if path.is_file():
            for instance, error in json.loads(path.read_text()).items():
                found.setdefault(instance, {"stage": stage, "error": error})
    return found


def without_failed(cfg: ExperimentConfig, stage: str, instance_ids: Sequence[str]) -> list[str]:
    """``instance_ids`` less those that failed in a per-instance stage before ``stage`` (logged, so the user sees
    why); an error when none is left."""
    failed = read_failures(cfg, per_instance_before(cfg, stage))
    for instance in (i for i in instance_ids if i in failed):
        log.warning("%s is left out: it failed in %s", instance, failed[instance]["stage"])
    kept = [i for i in instance_ids if i not in failed]
    if instance_ids and not kept:
        raise RuntimeError(f"every selected instance failed upstream: {failed}; see the stages' {FAILURES}")
    return kept


def run_name(instance_id: str, config, inputs: Mapping[str, Path]) -> str:
    """An instance's Ray Train run: its id and a hash of what it trains with (``config``, and the content of its
    ``inputs`` folders), so a re-run after a failure or Ctrl-C resumes the run's last checkpoint, and a changed
    config or new inputs start afresh. DreamBooth and train name their runs so."""
    key = hash_config([config, {name: input_hash(path) for name, path in inputs.items()}])
    return f"{instance_id}-{key[:12]}"
