"""The whole config (:class:`ExperimentConfig`, the rules that join its sections) and its building from layers."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from personalization.artifacts import write_text_atomic
from personalization.config.data import DataConfig, ModelConfig
from personalization.config.fields import path_field
from personalization.config.layers import (
    ConfigError,
    build_dataclass,
    merge,
    parse_override,
    read_yaml,
    require,
    skipping_path_checks,
    to_dict,
)
from personalization.config.synthesis import CutpasteConfig, DreamboothConfig, FilterConfig, GenerateConfig
from personalization.config.training import TrainConfig
from personalization.config.use import EvaluateConfig, FindConfig, RayConfig, RunConfig


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = path_field("outputs/experiment", output=True)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cutpaste: CutpasteConfig = field(default_factory=CutpasteConfig)
    dreambooth: DreamboothConfig = field(default_factory=DreamboothConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    find: FindConfig = field(default_factory=FindConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """The rules that join sections (each section has checked its own values already)."""
        require(bool(self.output_dir), "output_dir", "pass output_dir=DIR")
        require(bool(self.name), "name", "give the experiment a name")
        for source in self.train.positive_sources:
            self._check_positive_source(source)
        generates_negatives = self.generate.enabled and self.generate.negatives_per_category > 0
        if self.train.negatives == "generated" and not generates_negatives:
            raise ConfigError(
                "train.negatives=generated needs generate.enabled=true and generate.negatives_per_category > 0 "
                "(or train.negatives=auto / val / folder / stock)"
            )
        self._check_generated_backgrounds()

    def _check_generated_backgrounds(self) -> None:
        cut = self.cutpaste
        if not cut.enabled or cut.background_source(self.generate.enabled) != "generated":
            return
        if self.dreambooth.base_model:
            return
        how = "=generated" if cut.backgrounds == "generated" else "=auto (generated, as generate.enabled=true)"
        raise ConfigError(
            f"cutpaste.backgrounds{how} samples backgrounds from the pretrained generator, but "
            "dreambooth.base_model is empty: set "
            "dreambooth.base_model=HF_ID_OR_FOLDER (a diffusers Stable Diffusion), or use cutpaste.backgrounds="
            "procedural, or cutpaste.backgrounds_dir=DIR (photos)"
        )

    def _check_positive_source(self, source: str) -> None:
        if source == "cutpaste" and not self.cutpaste.enabled:
            raise ConfigError("train.positive_sources has cutpaste but cutpaste.enabled=false: enable it or drop it")
        if source not in ("dreambooth", "masked_dreambooth"):
            return
        if not self.generate.enabled:
            raise ConfigError(f"train.positive_sources has {source} but generate.enabled=false: enable generation")
        made = "masked_dreambooth" if self.dreambooth.masked else "dreambooth"
        if source != made:
            raise ConfigError(
                f"train.positive_sources has {source} but dreambooth.masked={self.dreambooth.masked} makes {made} "
                "images: make them agree"
            )


def path_fields(cls: type | None = None, prefix: str = "") -> dict[str, str]:
    """{dotted key: "input" | "output"} for every :func:`path_field` of ``cls`` (default: ExperimentConfig) and
    its sections."""
    cls = ExperimentConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= path_fields(hints[f.name], f"{prefix}{f.name}.")
        elif "path" in f.metadata:
            found[f"{prefix}{f.name}"] = f.metadata["path"]
    return found


# Building from layers

# Keys that were renamed: the old spelling (in a YAML, an override or a sweep space) fails naming the new one.
RENAMED_KEYS = {"generate.cfg": "generate.guidance_scale"}


def check_not_renamed(key: str) -> None:
    """A ConfigError naming the new key when ``key`` (dotted) is a renamed one."""
    if key in RENAMED_KEYS:
        new = RENAMED_KEYS[key]
        raise ConfigError(f"{key}: renamed to {new} (same meaning and values); write {new} instead")


def _dotted_keys(layer: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in layer.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


def build_config(*layers: dict) -> ExperimentConfig:
    """Defaults, then each layer of deltas in order; validated."""
    merged = to_dict(ExperimentConfig())
    for layer in layers:
        for key in _dotted_keys(layer):
            check_not_renamed(key)
        merged = merge(merged, layer)
    return build_dataclass(ExperimentConfig, merged)


def rebuild_config(*layers: dict) -> ExperimentConfig:
    """The driver's checked config (:func:`to_dict`) made again in a Ray worker or Tune trial: every rule holds
    but the existence of local files and folders, which the driver checked on its own node (data.root and the
    like need not be visible from the node a worker runs on)."""
    with skipping_path_checks():
        return build_config(*layers)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Defaults <- the YAML at ``path`` (deltas only) <- ``key=value`` overrides."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: {path} does not exist")
        try:
            delta = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        if not isinstance(delta, dict):
            raise ConfigError(f"{path}: must hold a mapping of config keys, got {type(delta).__name__}")
        layers.append(delta)
    layers.extend(parse_override(text) for text in overrides)
    return build_config(*layers)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def replace(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that also accepts dotted keys: ``replace(cfg, **{"train.epochs": 1})``."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    updated = dataclasses.replace(config, **flat)
    updated.validate()
    return updated
