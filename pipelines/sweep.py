"""`personalize sweep --config C --space tune_spaces/NAME.yaml`: Ray Tune over the experiment config.

Selection happens on a *validation* instance, never a test one. Each trial personalizes the same val instance V
(``data.instances=[V]`` if given, else the first val instance) and, after every epoch, reports
``val/pr_auc``: the classification PR-AUC of V's test photos among the test photos of all val instances, each
scored by max cosine to V's real train photos under the encoder being trained (:class:`ValidationProbe`, run
on rank 0 through ``pipelines.train``'s ``report_extra`` hook). Train metrics stream to Tune through
``TuneReportCallback`` on the TorchTrainer, so ASHA can stop a bad trial after any epoch.

Caching: the driver runs the upstream stages once, with the base config, into ``OUT/sweep/shared/`` (ingest,
cut-and-paste, DreamBooth). Generate-affecting keys (``generate.*``, ``filter.*`` except ``threshold``) are
grid/choice; each distinct combination is generated once into
``OUT/sweep/shared/generate-cache/<hash_config of the generate/filter sections>/generate/``. A trial's folder
``OUT/sweep/trials/<trial_id>/`` links ``ingest``, ``cutpaste``, ``dreambooth`` and its ``generate`` to those,
so trials only train; ``filter.threshold`` is applied when reading, so sweeping it never regenerates.

Outputs: ``OUT/sweep/results.csv`` (one row per trial), ``OUT/sweep/plots/<key>.png``, ``OUT/sweep/best.yaml``
(the best trial's swept keys, a config delta), Tune's state in ``OUT/sweep/tune/``: re-running the command after
an interruption resumes it with ``Tuner.restore``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from personalization.artifacts import hash_config, read_manifest
from personalization.config import ConfigError, ExperimentConfig, build_config, replace, to_dict
from personalization.errors import MissingInputError, UserError
from personalization.evaluation.probe import ValidationProbe
from personalization.output_lock import hold_output_lock
from personalization.sweeps import (
    SearchSpace,
    best_row,
    format_table,
    generate_variants,
    load_space,
    nest,
    plot_metric,
    save_best_delta,
    save_results_csv,
)
from pipelines import common
from pipelines.common import ray_session, stage_dir

STAGE = "sweep"
UPSTREAM = ("ingest", "cutpaste", "dreambooth")
log = logging.getLogger(f"personalize.{STAGE}")


# ----------------------------------------------------------------------------------------------------------------
# Driver: shared upstream outputs


def choose_instance(cfg: ExperimentConfig, instances: dict[str, dict]) -> str:
    """The val instance every trial personalizes: ``data.instances=[V]`` or the first val instance."""
    val = sorted(i for i, info in instances.items() if info["split"] == "val")
    if not val:
        raise UserError("sweep: the dataset has no `val` instances; sweeps select settings on val instances only")
    if not cfg.data.instances:
        return val[0]
    wrong = [i for i in cfg.data.instances if i not in val]
    if wrong or len(cfg.data.instances) != 1:
        raise UserError(
            f"sweep: data.instances={list(cfg.data.instances)}: give exactly one val instance (the sweep never "
            f"tunes on test instances); val instances: {', '.join(val)}"
        )
    return cfg.data.instances[0]


def generate_key(cfg: ExperimentConfig, base: ExperimentConfig) -> str:
    """Content hash of what the generate stage makes (filter.threshold excluded: it is applied on read)."""
    filter_cfg = {**to_dict(cfg.filter), "threshold": base.filter.threshold}
    return hash_config({"generate": to_dict(cfg.generate), "filter": filter_cfg})[:16]


def link_upstream(folder: Path, links: dict[str, Path]) -> None:
    """``folder/<name>`` -> ``target`` symlinks, so stages read shared outputs through their usual paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = folder / name
        if link.is_symlink() and Path(os.readlink(link)) == target.resolve():
            continue
        if link.is_symlink():
            link.unlink()
        if target.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)


def prepare_shared(cfg: ExperimentConfig, space: SearchSpace, sweep_dir: Path) -> tuple[ExperimentConfig, str]:
    """Run the upstream stages once into ``sweep_dir/shared``; returns the trials' base config and the instance."""
    from pipelines import cutpaste, dreambooth, generate, ingest

    shared = sweep_dir / "shared"
    base = replace(cfg, output_dir=str(shared))
    ingest.run(base)
    instance = choose_instance(cfg, common.load_instances(base))
    base = replace(base, **{"data.instances": (instance,), "data.max_instances": 0})
    if base.cutpaste.enabled:
        cutpaste.run(base)
    if base.dreambooth.enabled:
        dreambooth.run(base)
    if base.generate.enabled:
        for variant in generate_variants(space, base):
            folder = shared / "generate-cache" / generate_key(variant, base)
            link_upstream(folder, {name: shared / name for name in ("ingest", "dreambooth")})
            log.info(
                "sweep: generate for %s",
                {k: getattr(variant.generate, k.split(".")[1], None) for k in space.generate_keys()},
            )
            generate.run(replace(variant, output_dir=str(folder)))
    return base, instance


# ----------------------------------------------------------------------------------------------------------------
# Trials


def run_trial(params: dict, *, base: dict, instance: str) -> None:
    """One Tune trial: the base config plus ``params`` (dotted keys), trained on the shared upstream outputs."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines import train

    base_cfg = build_config(base)
    shared = Path(base_cfg.output_dir)
    cfg = build_config(base, nest(params))
    out = shared.parent / "trials" / ray.tune.get_context().get_trial_id()
    links = {name: shared / name for name in UPSTREAM}
    if cfg.generate.enabled:
        cached = shared / "generate-cache" / generate_key(cfg, base_cfg) / "generate"
        if not cached.is_dir():
            raise MissingInputError(f"sweep: no cached generate output {cached} for {params}")
        links["generate"] = cached
    link_upstream(out, links)
    cfg = replace(cfg, output_dir=str(out))
    probe = ValidationProbe(str(shared / "ingest" / "images.parquet"), instance, to_dict(cfg.model))
    train.run(cfg, callbacks=[TuneReportCallback()], report_extra=TrialReport(probe))


class TrialReport:
    """Rank 0's extra metrics: the validation probe, plus the id of the worker group's placement group so the
    driver can release it if Tune kills the trial (see :class:`ReleasePlacementGroups`)."""

    def __init__(self, probe: ValidationProbe):
        self.probe = probe

    def __call__(self, model: torch.nn.Module) -> dict:
        import ray.util

        group = ray.util.get_current_placement_group()
        return {**self.probe(model), "placement_group": group.id.hex() if group is not None else ""}


def _release_callback():
    from ray import tune

    class ReleasePlacementGroups(tune.Callback):
        """Remove a finished or stopped trial's Train placement group if it is still held.

        When ASHA (or the end of a trial) makes Tune kill a trial, its Ray Train controller dies with it; Train's
        detached cleaner then frees the workers' placement group through the State API, which needs the
        dashboard and a single Ray per host. Without it the next trial's workers would wait forever for CPUs.
        At the start of every run (a resumed one included), groups of trials interrupted earlier are released too.
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
            import ray
            from ray.util.placement_group import PlacementGroup, remove_placement_group

            group = (trial.last_result or {}).get("placement_group")
            if group and ray.util.placement_group_table().get(group, {}).get("state") == "CREATED":
                log.info("sweep: releasing placement group %s of trial %s", group, trial.trial_id)
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))

    return ReleasePlacementGroups()


def _tune_domain(domain):
    from ray import tune

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


def build_tuner(space: SearchSpace, trainable, base: ExperimentConfig, sweep_dir: Path, stop=None):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # One Tune iteration per epoch. ASHA stops any trial at max_t; one past the last epoch lets a finished trial
    # return normally (and commit its adapter) instead of being killed right after its final report.
    max_t = max_epochs(space, base) + 1
    if space.scheduler == "asha":
        grace = min(space.grace_period, max_t)
        scheduler = ASHAScheduler(max_t=max_t, grace_period=grace, reduction_factor=space.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    concurrent = space.max_concurrent_trials
    if not concurrent:  # each trial holds its fraction plus one CPU per Train worker; more would only queue
        per_trial = space.cpus_per_trial + base.train.num_workers
        concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
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


def collect_rows(results, space: SearchSpace, sweep_dir: Path, instance: str) -> list[dict]:
    """One row per trial: its id, swept values, the metric's last value, Tune iterations and a status.

    A trial is ``completed`` when its adapter was committed (``trials/<id>/train/<instance>/_manifest.json``),
    which stays true across a resume (Tune's iteration count restarts there); else ``stopped early`` (ASHA).
    """
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id", "")
        iterations = int(metrics.get("training_iteration", 0))
        value = metrics.get(space.metric)
        if result.error is not None:
            status = "error"
        elif value is None:
            status = "no result"
        elif read_manifest(sweep_dir / "trials" / str(trial_id) / "train" / instance) is not None:
            status = "completed"
        else:
            status = "stopped early"
        row = {"trial_id": trial_id}
        row.update({key: config.get(key) for key in space.domains})
        row[space.metric] = float(value) if value is not None else math.nan
        row.update({"iterations": iterations, "status": status})
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def _fingerprint(space: SearchSpace, base: ExperimentConfig) -> str:
    domains = {k: [d.kind, list(d.values)] for k, d in space.domains.items()}
    return hash_config({"domains": domains, "options": space.options, "base": to_dict(base)})


def run(cfg: ExperimentConfig, space_path: str | Path, *, stop=None) -> Path:
    """Run (or resume) the sweep; returns ``OUT/sweep``. ``stop``: a Tune ``Stopper`` / stop dict (new sweeps)."""
    from ray import tune

    from pipelines.run import check_before_start

    space = load_space(space_path, cfg)  # every key and candidate value checked before Ray starts
    check_before_start(cfg)
    sweep_dir = stage_dir(cfg, STAGE)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with ray_session(cfg):
        base, instance = prepare_shared(cfg, space, sweep_dir)
        fingerprint = _fingerprint(space, base)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=to_dict(base), instance=instance), {"cpu": space.cpus_per_trial}
        )
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
            state.write_text(json.dumps({"fingerprint": fingerprint, "space": str(space_path), "instance": instance}))
            tuner = build_tuner(space, trainable, base, sweep_dir, stop=stop)
        results = tuner.fit()
    rows = collect_rows(results, space, sweep_dir, instance)
    save_results_csv(rows, sweep_dir / "results.csv")
    plot_metric(rows, space, sweep_dir / "plots")
    best = best_row(rows, space.metric, space.mode)
    if best is not None:
        save_best_delta(best, space, sweep_dir / "best.yaml")
    print(format_table(rows))
    if best is not None:
        print(f"best ({space.metric}={best[space.metric]:.4f} on val instance {instance}): {sweep_dir / 'best.yaml'}")
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
