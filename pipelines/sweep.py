"""`personalize sweep --config C --space tune_spaces/NAME.yaml`: Ray Tune over the experiment config.

Selection happens on *validation* objects, never test ones, and on several of them. The val objects are split
once per sweep, deterministically from ``seed`` (personalization/val_probes.py), into *probes* (``val_objects``
in the space, default 3, capped by the dataset; or exactly ``data.instances``) and a *pool* (the rest). Each trial
trains every probe and, after every epoch, reports ``val/pr_auc``: the mean over probes of the classification
PR-AUC of the probe's test photos among the test photos of the *other probes* (never pool objects), scored by
max cosine to the probe's real train photos under the encoder being trained. With ``train.negatives=val`` a
probe trains against *pool* objects of its category only (never probes), so no object is both a training
negative and a distractor. Too few val objects for that stops the sweep before Ray starts, naming the fix.
How a trial trains its probes (one Ray Train run per trial, the probes in turn within each epoch, so ASHA can stop
it after any epoch) is in ``pipelines/sweep_trial.py``.

Caching: the driver runs the upstream stages once, with the base config, into ``OUT/sweep/shared/`` (ingest,
cut-and-paste, DreamBooth). Generate-affecting keys (``generate.*``, ``filter.*`` except ``threshold``) are
grid/choice; each distinct combination is generated once into
``OUT/sweep/shared/generate-cache/<hash_config of the generate/filter sections>/generate/``. A trial's folder
``OUT/sweep/trials/<trial_id>/`` links ``cutpaste``, ``dreambooth`` and its ``generate`` to those, and ``ingest``
to ``shared/ingest-probes`` (the ingest files with the probes hidden from the val split), so trials only
train; ``filter.threshold`` is applied when reading, so sweeping it never regenerates.

Outputs: ``OUT/sweep/sweep.json`` (the probes and the pool), ``OUT/sweep/results.csv`` (one row per trial, with
each probe's ``val/pr_auc/<probe>``), ``OUT/sweep/trials/<id>/probes.json`` (per probe and epoch),
``OUT/sweep/plots/<key>.png``, ``OUT/sweep/best.yaml`` (the best trial's swept keys, a config delta), Tune's
state in ``OUT/sweep/tune/``: re-running the command after an interruption resumes it with ``Tuner.restore``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.placement_group import PlacementGroup, remove_placement_group

from personalization.artifacts import commit_stage, hash_config
from personalization.config import ConfigError, ExperimentConfig, replace, to_dict
from personalization.errors import UserError
from personalization.output_lock import hold_output_lock
from personalization.sweeps import (
    SearchSpace,
    best_row,
    format_table,
    generate_variants,
    load_space,
    plot_metric,
    save_best_delta,
    save_results_csv,
)
from personalization.val_probes import ValPartition, hide_probes, partition_val
from pipelines import common
from pipelines.common import check_before_start, dataset_instances, ray_session, resolve_negatives, stage_dir
from pipelines.instances import runs_that_fit, train_run_resources
from pipelines.resources import wants_gpu
from pipelines.stages import BY_NAME
from pipelines.sweep_trial import PROBE_INGEST, RECORD, generate_key, is_complete, link_upstream, run_trial

STAGE = "sweep"
TRIAL_MEMORY = 512 * 2**20  # Ray's memory resource a trial's process reserves when it holds no CPU
log = logging.getLogger(f"personalize.{STAGE}")
# The stages a sweep runs once, into OUT/sweep/shared, before its trials (each run through the stage table).
_UPSTREAM = ("ingest", "cutpaste", "dreambooth", "generate")


# ----------------------------------------------------------------------------------------------------------------
# Driver: shared upstream outputs


def negatives_from_val(cfg: ExperimentConfig, space: SearchSpace, instances: dict[str, dict]) -> bool:
    """Whether trials may train on val objects as negatives (``train.negatives`` resolves to, or is swept
    over, ``val``): then the probes need a pool of val objects of their categories."""
    swept = space.domains.get("train.negatives")
    if swept is not None and {"val", "auto"} & set(swept.candidates()):
        return True
    val = [i for i, info in instances.items() if info["split"] == "val"]
    # `auto` is judged for the objects that can be probes with a pool: those with a val sibling of their category.
    siblings = [i for i in val if any(j != i and instances[j]["category"] == instances[i]["category"] for j in val)]
    return resolve_negatives(cfg, instances, siblings or val).train.negatives == "val"


def choose_probes(cfg: ExperimentConfig, space: SearchSpace, instances: dict[str, dict]) -> ValPartition:
    """The val objects every trial trains and scores (``data.instances`` if given, else ``val_objects`` of them,
    drawn with ``cfg.seed``) and the pool of the others (personalization/val_probes.py)."""
    needs_pool = negatives_from_val(cfg, space, instances)
    return partition_val(instances, space.val_objects, cfg.seed, needs_pool, chosen=cfg.data.instances)


def save_probe_view(shared: Path, split: ValPartition) -> Path:
    """``shared/ingest-probes``: the ingest stage's files (linked) with an ``instances.json`` that hides the
    probes from the val split, committed like a stage so that train hashes it from its manifest."""
    ingest, view = shared / "ingest", shared / PROBE_INGEST

    def build(tmp: Path) -> None:
        skip = {"instances.json", "_manifest.json", "config.yaml"}
        for entry in ingest.iterdir():
            if entry.name not in skip and not entry.name.startswith("."):
                (tmp / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        instances = json.loads((ingest / "instances.json").read_text())
        (tmp / "instances.json").write_text(json.dumps(hide_probes(instances, split.probes), indent=2))

    config = {"probes": split.probes, "pool": split.pool}
    return commit_stage(view, "ingest", config, build, inputs={"ingest": ingest})


def prepare_shared(cfg: ExperimentConfig, space: SearchSpace, sweep_dir: Path) -> tuple[ExperimentConfig, ValPartition]:
    """Run the upstream stages once into ``sweep_dir/shared`` for the probes; returns the trials' base config and
    the partition of the val objects."""
    ingest, cutpaste, dreambooth, generate = (BY_NAME[name].runner() for name in _UPSTREAM)
    shared = sweep_dir / "shared"
    base = replace(cfg, output_dir=str(shared))
    ingest(base)
    split = choose_probes(cfg, space, common.load_instances(base))
    save_probe_view(shared, split)
    base = replace(base, **{"data.instances": split.probes, "data.max_instances": 0})
    if base.cutpaste.enabled:
        cutpaste(base)
    if base.dreambooth.enabled:
        dreambooth(base)
    if base.generate.enabled:
        for variant in generate_variants(space, base):
            folder = shared / "generate-cache" / generate_key(variant, base)
            link_upstream(folder, {name: shared / name for name in ("ingest", "dreambooth")})
            log.info(
                "sweep: generate for %s",
                {k: getattr(variant.generate, k.split(".")[1], None) for k in space.generate_keys()},
            )
            generate(replace(variant, output_dir=str(folder)))
    return base, split


# ----------------------------------------------------------------------------------------------------------------
# Trials


def _release_callback():
    class ReleasePlacementGroups(tune.Callback):
        """Remove a finished or stopped trial's Train placement group if it is still held.

        When ASHA (or the end of a trial) makes Tune kill a trial, its Ray Train controller dies with it; Train's
        detached cleaner then frees the workers' placement group through the State API, which needs the
        dashboard and a single Ray per host. Without it the next trial's workers would wait forever for CPUs.
        At the start of every run (a resumed one included), groups of trials interrupted earlier are released too.
        Every report of a trial names its workers' group (pipelines/sweep_trial.py).
        """

        def setup(self, **info):
            self.swept = False

        def on_step_begin(self, iteration, trials, **info):
            # A resumed sweep: the trials that were running when it was interrupted may still hold their groups.
            if not getattr(self, "swept", True):
                self.swept = True
                for trial in trials:
                    self._release(trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

        def _release(self, trial):
            group = (trial.last_result or {}).get("placement_group")
            if group and ray.util.placement_group_table().get(group, {}).get("state") == "CREATED":
                log.info("sweep: releasing placement group %s of trial %s", group, trial.trial_id)
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))

    return ReleasePlacementGroups()


def _tune_domain(domain):
    low_high = domain.values
    return {
        "grid": lambda: tune.grid_search(list(domain.values)),
        "choice": lambda: tune.choice(list(domain.values)),
        "uniform": lambda: tune.uniform(*low_high),
        "loguniform": lambda: tune.loguniform(*low_high),
        "randint": lambda: tune.randint(*low_high),
    }[domain.kind]()


def max_epochs(space: SearchSpace, base: ExperimentConfig) -> int:
    epochs = space.domains.get("train.epochs")
    return int(max(epochs.candidates())) if epochs is not None else base.train.epochs


def trial_resources(space: SearchSpace) -> dict[str, float]:
    """What a trial's own process holds (its Train workers ask for theirs): ``cpus_per_trial`` CPUs, or with 0
    Ray's memory resource only, since Tune needs a trial to reserve something."""
    return {"cpu": space.cpus_per_trial} if space.cpus_per_trial else {"memory": TRIAL_MEMORY}


def trial_needs(space: SearchSpace, base: ExperimentConfig) -> dict[str, float]:
    """One trial's process and its Train workers (a CPU each, or their GPU share), per Ray resource."""
    needs = train_run_resources(base, wants_gpu(base, "train"))
    needs["CPU"] = needs.get("CPU", 0.0) + space.cpus_per_trial
    return needs


def build_tuner(space: SearchSpace, trainable, base: ExperimentConfig, sweep_dir: Path, stop=None):
    # One report per epoch; ASHA counts the reports' epochs (a restarted trial does not report its done epochs
    # again). It stops any trial at max_t; one past the last epoch lets a finished trial return normally (and
    # commit its adapters) instead of being killed right after its final report.
    max_t = max_epochs(space, base) + 1
    if space.scheduler == "asha":
        grace = min(space.grace_period, max_t)
        scheduler = ASHAScheduler(
            time_attr="epoch", max_t=max_t, grace_period=grace, reduction_factor=space.reduction_factor
        )
    else:
        scheduler = FIFOScheduler()
    # By default as many trials as the cluster holds side by side (counting autoscaler nodes): more would queue.
    concurrent = space.max_concurrent_trials or runs_that_fit(trial_needs(space, base))
    return tune.Tuner(
        trainable,
        param_space={key: _tune_domain(domain) for key, domain in space.domains.items()},
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            num_samples=space.num_samples,
            scheduler=scheduler,
            max_concurrent_trials=concurrent,
            time_budget_s=space.time_budget_s or None,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(sweep_dir.resolve()), stop=stop, callbacks=[_release_callback()], verbose=1
        ),
    )


def collect_rows(results, space: SearchSpace, sweep_dir: Path) -> list[dict]:
    """One row per trial: its id, swept values, the metric's last value (the mean over probes), each probe's
    ``val/pr_auc/<probe>``, the epochs reported (``iterations``) and a status.

    A trial is ``completed`` when its ``trials/<id>/probes.json`` holds every epoch of every probe, which stays
    true across a resume; else ``stopped early`` (ASHA).
    """
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id", "")
        value = metrics.get(space.metric)
        record_path = sweep_dir / "trials" / str(trial_id) / RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if result.error is not None:
            status = "error"
        elif value is None:
            status = "no result"
        else:
            status = "completed" if is_complete(record) else "stopped early"
        row = {"trial_id": trial_id}
        row.update({key: config.get(key) for key in space.domains})
        row[space.metric] = float(value) if value is not None else math.nan
        row.update({k: float(v) for k, v in sorted(metrics.items()) if k.startswith("val/pr_auc/")})
        row.update({"iterations": int(metrics.get("epoch", 0)), "status": status})
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def _fingerprint(space: SearchSpace, base: ExperimentConfig) -> str:
    domains = {k: [d.kind, list(d.values)] for k, d in space.domains.items()}
    return hash_config({"domains": domains, "options": space.options, "base": to_dict(base)})


def run(cfg: ExperimentConfig, space_path: str | Path, *, stop=None) -> Path:
    """Run (or resume) the sweep; returns ``OUT/sweep``. ``stop``: a Tune ``Stopper`` / stop dict (new sweeps)."""
    space = load_space(space_path, cfg)  # every key and candidate value checked before Ray starts
    check_before_start(cfg)
    known = dataset_instances(cfg)  # read from the dataset's info file, no image read
    if known:
        choose_probes(cfg, space, known)  # too few val objects: stop before Ray starts
    sweep_dir = stage_dir(cfg, STAGE)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with ray_session(cfg):
        base, split = prepare_shared(cfg, space, sweep_dir)
        fingerprint = _fingerprint(space, base)
        trial = tune.with_parameters(run_trial, base=to_dict(base), probes=list(split.probes), pool=list(split.pool))
        trainable = tune.with_resources(trial, trial_resources(space))
        tune_dir, state = sweep_dir / "tune", sweep_dir / "sweep.json"
        if tune_dir.exists() and tune.Tuner.can_restore(str(tune_dir)):
            recorded = json.loads(state.read_text()).get("fingerprint") if state.is_file() else None
            if recorded != fingerprint:
                raise UserError(
                    f"{tune_dir} holds a sweep of another space or base config; remove {tune_dir} (and "
                    f"{sweep_dir / 'trials'}) to start over, or pick another output_dir"
                )
            log.info("sweep: resuming %s", tune_dir)
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
        else:
            record = {"fingerprint": fingerprint, "space": str(space_path), **asdict(split)}
            state.write_text(json.dumps(record, indent=2))
            tuner = build_tuner(space, trainable, base, sweep_dir, stop=stop)
        results = tuner.fit()
    rows = collect_rows(results, space, sweep_dir)
    save_results_csv(rows, sweep_dir / "results.csv")
    plot_metric(rows, space, sweep_dir / "plots")
    best = best_row(rows, space.metric, space.mode)
    if best is not None:
        save_best_delta(best, space, sweep_dir / "best.yaml")
    print(format_table(rows))
    if best is not None:
        probes = ", ".join(split.probes)
        print(
            f"best ({space.metric}={best[space.metric]:.4f}, mean over val objects {probes}): {sweep_dir / 'best.yaml'}"
        )
    return sweep_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"personalize {STAGE}")
    parser.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/learning_rate.yaml")
    common.add_config_arguments(parser)
    args = parser.parse_args(argv)
    common.setup_logging()
    try:
        cfg = common.config_from_args(args)
        load_space(args.space, cfg)
    except ConfigError as error:
        parser.exit(2, f"personalize {STAGE}: config error: {error}\n")
    with common.user_errors(STAGE), hold_output_lock(cfg.output_dir):
        out = run(cfg, args.space)
    print(f"{STAGE}: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
