"""Typed, frozen configuration: one dataclass per stage, composed into :class:`ExperimentConfig`.

Layers, lowest first: the defaults in the section classes, an experiment YAML that holds only deltas, then
``key=value`` dotted overrides from the command line. Every value is type-checked and every section validates
itself when built, so a bad config fails at once with the key and the fix in the message.

Where things are: ``data`` (DataConfig, ModelConfig), ``synthesis`` (Cutpaste, Dreambooth, Generate, Filter),
``training`` (TrainConfig), ``use`` (Evaluate, Find, Ray, Run), ``experiment`` (ExperimentConfig, its joint rules,
load/build/save), ``fields`` (path and GPU-choice fields), ``layers`` (the generic typed-dataclass machinery).
Import from this package: ``from personalization.config import TrainConfig``.
"""

from personalization.config.data import DataConfig, ModelConfig
from personalization.config.experiment import (
    RENAMED_KEYS,
    ExperimentConfig,
    build_config,
    check_not_renamed,
    load_config,
    path_fields,
    rebuild_config,
    replace,
    save_config,
)
from personalization.config.fields import GpuChoice, check_gpu_choice, path_field
from personalization.config.layers import ConfigError, parse_override, to_dict
from personalization.config.synthesis import (
    DREAMBOOTH_LEARNING_RATES,
    CutpasteConfig,
    DreamboothConfig,
    FilterConfig,
    GenerateConfig,
)
from personalization.config.training import TrainConfig
from personalization.config.use import EvaluateConfig, FindConfig, RayConfig, RunConfig

__all__ = [
    "DREAMBOOTH_LEARNING_RATES",
    "RENAMED_KEYS",
    "ConfigError",
    "CutpasteConfig",
    "DataConfig",
    "DreamboothConfig",
    "EvaluateConfig",
    "ExperimentConfig",
    "FilterConfig",
    "FindConfig",
    "GenerateConfig",
    "GpuChoice",
    "ModelConfig",
    "RayConfig",
    "RunConfig",
    "TrainConfig",
    "build_config",
    "check_gpu_choice",
    "check_not_renamed",
    "load_config",
    "parse_override",
    "path_field",
    "path_fields",
    "rebuild_config",
    "replace",
    "save_config",
    "to_dict",
]
