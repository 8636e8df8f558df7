"""What every stage module shares: Ray start-up, stage folders, and the `main(argv)` form."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from personalization.config import ConfigError, ExperimentConfig, load_config, path_fields, replace, to_dict
from personalization.contrastive.negatives import choose_negatives
from personalization.contrastive.released import check_released_positives
from personalization.datasets import DatasetError, detect_layout
from personalization.datasets.layouts import info_file
from personalization.errors import MissingInputError, UserError
from personalization.output_lock import hold_output_lock
from personalization.paths import inside
from personalization.synthesis.prompts_llm import PROMPTS_FILE, check_llm_endpoint
from pipelines.local_ray import closed_local_ray

log = logging.getLogger("personalize")


def stage_dir(cfg: ExperimentConfig, stage: str, *parts: str) -> Path:
    """``OUT/<stage>/<parts...>``: where a stage commits its output. Every part is one folder name (no ``..``,
    no separator, not absolute), so no stage output can land outside ``output_dir``."""
    return inside(cfg.output_dir, stage, *parts)


def resolved(cfg: ExperimentConfig) -> dict:
    """The whole resolved config as plain data, saved beside every stage output."""
    return to_dict(cfg)


@contextlib.contextmanager
def ray_session(cfg: ExperimentConfig) -> Iterator[None]:
    """Use the Ray already running in this process, else connect to ``ray.address``, else start a local one.

    A local Ray is private to this run: token auth with a token made for it, every port on 127.0.0.1
    (pipelines/local_ray.py). Only a Ray started here is shut down here.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Inside a Ray Job (`ray job submit`, `personalize --address`) Ray sets RAY_ADDRESS: join that cluster.
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    local = closed_local_ray(num_cpus=cfg.ray.num_cpus or None, include_dashboard=cfg.ray.dashboard)
    with local as (context, token_file):
        url = context.dashboard_url
        dashboard = f"http://{url} (it asks for the token in {token_file})" if url else "off (ray.dashboard=false)"
        log.info("Ray dashboard: %s; this run's Ray listens on 127.0.0.1 only, with token auth", dashboard)
        yield


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (deltas from the defaults), e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=1")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return absolute_paths(load_config(args.config, args.overrides))


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with every relative local path made absolute (from this process's working directory): Ray workers
    run in other working directories. The fields are those marked ``path_field`` in personalization/config/; an
    input that does not exist here (a Hugging Face id such as facebook/dinov2-base) stays as given."""
    changes = {}
    for key, kind in path_fields().items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value and not os.path.isabs(value) and (kind == "output" or os.path.exists(value)):
            changes[key] = os.path.abspath(value)
    return replace(cfg, **changes) if changes else cfg


def stage_main(stage: str, run: Callable[[ExperimentConfig], Path], argv: Sequence[str] | None = None) -> int:
    """The common ``personalize <stage> --config X key=value ...`` entry point."""
    parser = argparse.ArgumentParser(prog=f"personalize {stage}")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(args)
    except ConfigError as error:
        parser.exit(2, f"personalize {stage}: config error: {error}\n")
    with user_errors(stage), hold_output_lock(cfg.output_dir):
        out = run(cfg)
    print(f"{stage}: wrote {out}")
    return 0


class InstanceFailures(RuntimeError):
    """Some instances failed; every other instance finished and committed. ``failures``: {instance: error}."""

    def __init__(self, stage: str, failures: dict[str, str], finished: int, listed_in: str = ""):
        self.stage, self.failures = stage, dict(failures)
        listed = "; ".join(f"{i}: {e.splitlines()[0] if e else ''}" for i, e in sorted(failures.items()))
        super().__init__(
            f"{stage}: {len(failures)} instance(s) failed, {finished} finished ({listed}). They are listed in "
            f"{listed_in or f'OUT/{stage}/failures.json'}; re-running retries only them (the others are kept)."
        )


@contextlib.contextmanager
def user_errors(command: str) -> Iterator[None]:
    """The project's own :class:`UserError` (bad input, config, order of stages): print its message, exit 2.

    Anything else is a bug and keeps its traceback (exit 1). Set PERSONALIZE_DEBUG=1 to see the traceback of a
    user error too.
    """
    try:
        yield
    except InstanceFailures as error:  # the other instances finished: no traceback, exit 1
        print(f"personalize {command}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except UserError as error:
        if os.environ.get("PERSONALIZE_DEBUG"):
            raise
        print(f"personalize {command}: error: {error}", file=sys.stderr)
        print("(set PERSONALIZE_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        # A full disk or an output folder that cannot be written: the user's to fix, not a bug (no traceback).
        if error.errno not in _STORAGE_ERRNOS or os.environ.get("PERSONALIZE_DEBUG"):
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"personalize {command}: error: {error.strerror}{where}; make room on the disk or pass a writable "
              "output_dir=DIR (no stage output was committed)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=False)


def load_instances(cfg: ExperimentConfig) -> dict[str, dict]:
    """``OUT/ingest/instances.json``: {instance_id: {"category", "split"}}; a clear error when ingest has not run."""

    path = stage_dir(cfg, "ingest") / "instances.json"
    if not path.is_file():
        raise MissingInputError(f"{path} is missing: run `personalize ingest` (or `personalize run`) first")
    return json.loads(path.read_text())


def select_instances(cfg: ExperimentConfig, instances: dict[str, dict]) -> list[str]:
    """The instances to personalize: ``data.instances`` if given, else every `test`/`user` instance, sorted,
    capped at ``data.max_instances``. `val` instances are never selected by default: they are for tuning."""
    if cfg.data.instances:
        unknown = [i for i in cfg.data.instances if i not in instances]
        if unknown:
            raise UserError(
                f"data.instances: {unknown} not in the dataset; known instances: {', '.join(sorted(instances)[:20])}"
            )
        chosen = list(cfg.data.instances)
    else:
        chosen = sorted(i for i, info in instances.items() if info["split"] in ("test", "user"))
    if cfg.data.max_instances:
        chosen = chosen[: cfg.data.max_instances]
    if not chosen:
        raise UserError("no instances selected: the dataset has no `test` instances; pass data.instances=[...]")
    return chosen


def dataset_instances(cfg: ExperimentConfig) -> dict[str, dict]:
    """{instance: {"category", "split"}}: ``OUT/ingest/instances.json`` when ingest has run, else a look at
    ``data.root`` (its info file, or the plain-folder settings; no image is read). {} when it cannot tell yet:
    ingest then reports what is wrong with the dataset."""
    if (stage_dir(cfg, "ingest") / "instances.json").is_file():
        return load_instances(cfg)
    data = cfg.data
    try:
        layout = detect_layout(data.root, data.layout)
        if layout == "folder":
            return {data.instance_id or Path(data.root).resolve().name: {"category": data.category, "split": "user"}}
        info = json.loads((Path(data.root) / info_file(layout)).read_text())
        return {str(i): {"category": str(info["class_to_sc"][i]), "split": str(info["class_to_split"][i])}
                for i in info["classes"]}  # fmt: skip
    except (DatasetError, OSError, ValueError, KeyError, TypeError):
        return {}


def resolve_negatives(
    cfg: ExperimentConfig, instances: dict[str, dict] | None = None, selected: Sequence[str] | None = None
) -> ExperimentConfig:
    """``cfg`` with ``train.negatives`` made concrete for the instances it trains (``auto`` resolved by
    :func:`personalization.contrastive.negatives.choose_negatives`; a UserError naming the fixes when nothing
    applies). The one place train, `personalize run`'s check and the sweep resolve it."""
    instances = dataset_instances(cfg) if instances is None else instances
    if not instances:  # nothing to judge by yet (ingest reports the dataset's problems; the config its own)
        return cfg
    selected = select_instances(cfg, instances) if selected is None else selected
    mode = choose_negatives(cfg.train, cfg.generate, instances, selected)
    return cfg if mode == cfg.train.negatives else replace(cfg, **{"train.negatives": mode})


def check_before_start(cfg: ExperimentConfig) -> None:
    """Fail on what only the dataset can tell, before any expensive work (`personalize run` and `sweep`). The
    config's own rules, cross-section ones included, were checked when it was built (``ExperimentConfig.validate``),
    for every command. What the selected instances need from outside OUT is checked here too: their
    train.positives_dir folders (positive source released) and, for generate.prompt_source=llm, the endpoint's
    variables (:func:`check_prompt_source`)."""
    cfg.data.require_root()
    instances = dataset_instances(cfg)  # read once for the three checks below
    selected = select_instances(cfg, instances) if instances else []
    resolve_negatives(cfg, instances, selected)  # negatives=auto with nothing to draw from stops here
    if "released" in cfg.train.positive_sources:
        check_released_positives(cfg.train.positives_dir, selected)
    if cfg.generate.enabled:
        check_prompt_source(cfg, selected, instances)


def check_prompt_source(cfg: ExperimentConfig, selected: Sequence[str], instances: dict[str, dict]) -> None:
    """generate.prompt_source=llm with prompts still to ask for (none in OUT/generate/prompts.json yet): the
    PERSONALIZE_LLM_* variables are set, else a UserError naming them (personalization/synthesis/llm.py)."""
    if cfg.generate.prompt_source == "llm":
        path = stage_dir(cfg, "generate", PROMPTS_FILE)
        categories = {i: instances[i]["category"] for i in selected}
        check_llm_endpoint(categories, path, cfg.generate.num_prompts, os.environ)


def scorer_kwargs(cfg: ExperimentConfig) -> dict:
    """The DreamSim Scorer's constructor arguments (personalization/filtering/scorer.py), for generate and filter."""
    return {
        "real_table": str(stage_dir(cfg, "ingest", "images.parquet")),
        "cache_dir": cfg.filter.cache_dir,
        "dreamsim_type": cfg.filter.dreamsim_type,
        "masker": cfg.filter.masker,
        "sam_weights": cfg.filter.sam_weights,
        "batch_size": cfg.filter.batch_size,
    }
