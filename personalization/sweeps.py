"""Search spaces for `personalize sweep` (no Ray here): parsing and checking against the config schema, and the
results table, plots and best-config delta.

A space is a YAML file that maps dotted config keys to a domain, plus a few top-level options::

    metric: val/pr_auc            # val/pr_auc (validation instances only) or train/loss
    mode: max                     # max | min
    num_samples: 1                # grid points are each repeated num_samples times; random domains sampled
    scheduler: asha               # asha (early stopping per epoch) | fifo
    val_objects: 3                # val objects a trial trains and is scored on (mean val/pr_auc); >= 2
    train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
    generate.guidance_scale: {grid: [4.0, 5.0, 7.5]}

Domains: ``grid: [v, ...]`` (every value), ``choice: [v, ...]`` (sampled), ``uniform: [lo, hi]``,
``loguniform: [lo, hi]``, ``randint: [lo, hi)``. Sweepable sections are ``train``, ``model``, ``generate`` and
``filter``: the upstream stages (ingest, cut-and-paste, DreamBooth) run once per sweep and are shared. Keys that
change what the generate stage makes (``generate.*``, ``filter.*`` except ``threshold``, which is applied when
reading) must be ``grid`` or ``choice`` so that each value's images are generated once, before the trials start.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from personalization.config import ConfigError, ExperimentConfig, build_config, check_not_renamed, to_dict

SWEEPABLE_SECTIONS = ("train", "model", "generate", "filter")
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
METRICS = ("val/pr_auc", "train/loss")
READ_TIME_KEYS = ("filter.threshold",)  # applied when training reads the generated table: never regenerates


@dataclass(frozen=True)
class Domain:
    """One swept key: ``kind`` in DOMAINS and its ``values`` (grid/choice) or ``[low, high]`` bounds."""

    key: str
    kind: str
    values: tuple

    @property
    def enumerable(self) -> bool:
        return self.kind in ("grid", "choice")

    def candidates(self) -> tuple:
        """The values to check against the schema: every listed value, or the range's ends."""
        if self.enumerable:
            return self.values
        low, high = self.values
        return (low, high - 1) if self.kind == "randint" else (low, high)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed, checked space: the swept domains and the Tune options."""

    domains: dict[str, Domain]
    metric: str = "val/pr_auc"
    mode: str = "max"
    num_samples: int = 1
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0 = as many as the cluster fits (each trial's Train workers, and its own CPUs)
    # CPUs a trial's own process holds. It only waits on its TorchTrainer, so by default none (it reserves some
    # of Ray's memory resource instead, pipelines/sweep.py): two one-worker trials then fit on 2 CPUs, where 0.1
    # left one CPU idle through a whole sweep.
    cpus_per_trial: float = 0.0
    time_budget_s: float = 0.0  # 0 = no limit
    val_objects: int = 3  # val objects each trial trains and scores (personalization/val_probes.py); capped
    source: str = ""
    options: dict = field(default_factory=dict)

    def generate_keys(self) -> list[str]:
        """Swept keys whose values change the generated images (each distinct combination is generated once)."""
        return [k for k in self.domains if is_generate_key(k)]


OPTION_TYPES = {
    f.name: f.type for f in dataclasses.fields(SearchSpace) if f.name not in ("domains", "source", "options")
}


def is_generate_key(key: str) -> bool:
    return key.split(".")[0] in ("generate", "filter") and key not in READ_TIME_KEYS


def nest(flat: dict[str, Any]) -> dict:
    """``{"train.loss": "hinge"}`` -> ``{"train": {"loss": "hinge"}}``."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _check_key(key: str, source: str) -> None:
    try:
        check_not_renamed(key)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    section, _, name = key.partition(".")
    sections = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}
    if section not in SWEEPABLE_SECTIONS or not name or "." in name:
        where = "a config section the sweep shares across trials" if section in sections else "not a config field"
        raise ConfigError(
            f"{source}: {key!r} is {where}; sweep keys are `section.field` with section one of "
            f"{list(SWEEPABLE_SECTIONS)} (options: {sorted(OPTION_TYPES)})"
        )
    section_cls = typing.get_type_hints(ExperimentConfig)[section]
    fields = sorted(f.name for f in dataclasses.fields(section_cls))
    if name not in fields:
        raise ConfigError(f"{source}: {key!r} is not a config field; valid {section}.* keys: {', '.join(fields)}")


def _parse_domain(key: str, spec: Any, source: str) -> Domain:
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS):
        raise ConfigError(f"{source}: {key}: give one domain, e.g. {{grid: [4.0, 5.0]}}; domains: {list(DOMAINS)}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: {key}: {kind} takes a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        try:
            low, high = (float(v) for v in values) if kind != "randint" else (int(v) for v in values)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key}: {kind} takes [low, high] numbers, got {values!r}") from None
        if len(values) != 2 or not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"{source}: {key}: {kind} needs [low, high] with low < high (> 0 for log), got {values}")
        values = [low, high]
    elif len(set(map(repr, values))) != len(values):
        raise ConfigError(f"{source}: {key}: {kind} lists a value twice: {values}")
    if is_generate_key(key) and kind not in ("grid", "choice"):
        raise ConfigError(
            f"{source}: {key} changes the generated images, so it must be grid or choice (each value is generated "
            f"once before the trials start), not {kind}"
        )
    return Domain(key, kind, tuple(values))


def parse_space(data: dict, base: ExperimentConfig, source: str = "space") -> SearchSpace:
    """Check a space mapping against the config schema: every key, and every candidate value on top of ``base``."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: a space is a mapping of dotted config keys to domains")
    options, domains = {}, {}
    for key, spec in data.items():
        if key in OPTION_TYPES:
            options[key] = spec
        else:
            _check_key(str(key), source)
            domains[key] = _parse_domain(key, spec, source)
    if not domains:
        raise ConfigError(f"{source}: no swept keys; add e.g. `train.learning_rate: {{loguniform: [1.0e-5, 1.0e-3]}}`")
    base_dict = to_dict(base)
    for domain in domains.values():
        for value in domain.candidates():
            try:
                build_config(base_dict, nest({domain.key: value}))
            except ConfigError as error:
                raise ConfigError(f"{source}: {domain.key}={value!r} is not a valid config value: {error}") from None
    space = SearchSpace(domains=domains, source=source, options=options)
    for name, value in options.items():
        kind = {"int": int, "float": (int, float), "str": str}[OPTION_TYPES[name]]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{source}: option {name} must be {OPTION_TYPES[name]}, got {value!r}")
    space = dataclasses.replace(space, **options)
    checks = {
        "metric": space.metric in METRICS,
        "mode": space.mode in ("max", "min"),
        "scheduler": space.scheduler in ("asha", "fifo"),
        "num_samples": space.num_samples >= 1,
        "grace_period": space.grace_period >= 1,
        "reduction_factor": space.reduction_factor >= 2,
        "max_concurrent_trials": space.max_concurrent_trials >= 0,
        "cpus_per_trial": 0 <= space.cpus_per_trial <= 64,
        "time_budget_s": space.time_budget_s >= 0,
        "val_objects": space.val_objects >= 2,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(
            f"{source}: option {bad[0]}={getattr(space, bad[0])!r} is invalid (metric: {list(METRICS)}, mode: max|min, "
            "scheduler: asha|fifo, counts >= 1, reduction_factor >= 2, val_objects >= 2, 0 <= cpus_per_trial <= 64)"
        )
    return space


def load_space(path: str | Path, base: ExperimentConfig) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space: {path} does not exist; see tune_spaces/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    return parse_space(data, base, source=str(path))


def generate_variants(space: SearchSpace, base: ExperimentConfig) -> list[ExperimentConfig]:
    """Every distinct config the generate stage sees: the product of the generate keys' values (or just ``base``)."""
    keys = space.generate_keys()
    combos = itertools.product(*(space.domains[k].values for k in keys))
    base_dict = to_dict(base)
    return [build_config(base_dict, nest(dict(zip(keys, combo, strict=True)))) for combo in combos]


# ----------------------------------------------------------------------------------------------------------------
# Results


def save_results_csv(rows: list[dict], path: str | Path) -> Path:
    """One row per trial (``trial_id``, the swept values, the metric, ``iterations``, ``status``) as CSV."""
    path = Path(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(row.get(c, ""))) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(row.get(c, "")).ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The trial with the best finite metric (``max`` or ``min``), or None when no trial reported one."""
    scored = [r for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def save_best_delta(row: dict, space: SearchSpace, path: str | Path) -> Path:
    """The best trial's swept values as a config delta YAML (load it with ``--config`` or merge it by hand)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(nest({k: row[k] for k in space.domains}), sort_keys=True))
    return path


def plot_metric(rows: list[dict], space: SearchSpace, out_dir: str | Path) -> list[Path]:
    """``<out_dir>/<key>.png``: the metric of every trial against each swept value (log axis for loguniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, domain in space.domains.items():
        points = [(r[key], r[space.metric]) for r in rows if isinstance(r.get(space.metric), float)]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        if points and all(isinstance(x, int | float) and not isinstance(x, bool) for x, _ in points):
            ax.scatter([x for x, _ in points], [y for _, y in points])
            if domain.kind == "loguniform":
                ax.set_xscale("log")
        elif points:
            labels = sorted({str(x) for x, _ in points})
            ax.scatter([labels.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(space.metric)
        ax.set_title(f"{space.metric} vs {key}")
        fig.tight_layout()
        paths.append(out_dir / f"{key.replace('/', '_')}.png")
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)
    return paths
