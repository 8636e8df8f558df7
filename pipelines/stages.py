"""The one table of stages and commands: `personalize`'s command list, `personalize run`'s plan and the order that
per-instance failure tracking follows all read it.

A stage is a module of ``pipelines/`` with ``run(cfg) -> Path`` and ``main(argv)``. ``in_run`` says whether
`personalize run` includes it for a config (``None``: a command of its own only, never part of a run);
``per_instance`` marks the stages that commit one unit per instance and record per-instance failures, which the
stages after them leave out. Adding a stage is one row here (in pipeline order) plus its module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from personalization.config import ExperimentConfig


def _always(cfg: ExperimentConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # in pipelines/
    help: str
    in_run: Callable[[ExperimentConfig], bool] | None = _always
    per_instance: bool = False

    def runner(self) -> Callable[[ExperimentConfig], Path]:
        """The stage's ``run(cfg)`` (its module is imported only now)."""
        return importlib.import_module(f"pipelines.{self.module}").run


# In pipeline order.
STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingest", "read a dataset folder (PODS / Dogs / DF2 / your own photos) into the image table"),
    Stage(
        "dreambooth",
        "dreambooth",
        "personalize Stable Diffusion on each instance's photos (Ray Train)",
        in_run=lambda cfg: cfg.dreambooth.enabled,
        per_instance=True,
    ),
    Stage(
        "generate",
        "generate",
        "sample positives and category negatives (Ray Data actors), optionally filtered",
        in_run=lambda cfg: cfg.generate.enabled,
    ),
    Stage("filter", "filter", "score generated images with DreamSim against the real photos", in_run=None),
    Stage(
        "cutpaste",
        "cutpaste",
        "paste the masked real object onto backgrounds (Ray Data tasks)",
        in_run=lambda cfg: cfg.cutpaste.enabled,
    ),
    Stage("train", "train", "LoRA InfoNCE fine-tuning of the vision encoder (Ray Train)", per_instance=True),
    Stage("evaluate", "evaluate", "pretrained vs personalized encoder on the four tasks", per_instance=True),
)
BY_NAME = {stage.name: stage for stage in STAGES}
ORDER = tuple(stage.name for stage in STAGES)
PER_INSTANCE = tuple(stage.name for stage in STAGES if stage.per_instance)

# Commands that are not pipeline stages: command -> (module in pipelines/, one-line help).
TOOLS: dict[str, tuple[str, str]] = {
    "find": ("find", "rank a folder of photos by how likely each shows the object (personalized vs pretrained)"),
    "run": ("run", "all stages end to end, then summary.json and report.html"),
    "sweep": ("sweep", "Ray Tune over config keys (--space tune_spaces/NAME.yaml), scored on val instances"),
    "compare": ("compare", "several runs side by side as the paper's tables (mean +- sd over seeds), Markdown + HTML"),
    "make-toy": ("make_toy", "write the procedural toy benchmark in the PODS layout"),
    "zoo": ("zoo", "build the tiny offline models (and locate the real MobileNetV2)"),
}
# Every `personalize` command: the stages, then the tools.
COMMANDS: dict[str, tuple[str, str]] = {s.name: (s.module, s.help) for s in STAGES} | TOOLS


def run_plan(cfg: ExperimentConfig) -> list[Stage]:
    """The stages `personalize run` runs for ``cfg``, in order."""
    return [stage for stage in STAGES if stage.in_run is not None and stage.in_run(cfg)]


def per_instance_before(cfg: ExperimentConfig, stage: str) -> list[str]:
    """The per-instance stages ``cfg`` runs before ``stage`` (a stage name, or "report" for after all of them)."""
    end = ORDER.index(stage) if stage in ORDER else len(ORDER)
    return [s.name for s in STAGES[:end] if s.per_instance and s.in_run is not None and s.in_run(cfg)]
