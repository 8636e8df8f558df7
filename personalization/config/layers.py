"""Typed-dataclass machinery behind :mod:`personalization.config`: value checking, layering, overrides.

Generic: it knows dataclasses and type hints, not the project's sections. A section is a frozen dataclass with a
``validate()`` method; :func:`build_dataclass` type-checks every value against the field's annotation, rejects
unknown keys with a close-match hint, builds nested sections, then calls ``validate()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from personalization.errors import UserError


class ConfigError(UserError):
    """A config key, type or value that cannot work; the message names the key and the fix."""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


_CHECK_PATHS = contextvars.ContextVar("check_paths", default=True)


def require_path(path: str, test: Callable[[Path], bool], key: str, message: str) -> None:
    """A rule that a local file or folder exists (``test``: ``Path.is_dir``, ...). Checked where a config is made
    from the user's input; skipped where a worker rebuilds the driver's checked config (:func:`skipping_path_checks`):
    a worker on another node need not see the driver's dataset or folders."""
    if _CHECK_PATHS.get():
        require(test(Path(path)), key, message)


@contextlib.contextmanager
def skipping_path_checks() -> Iterator[None]:
    token = _CHECK_PATHS.set(False)
    try:
        yield
    finally:
        _CHECK_PATHS.reset(token)


def check_fraction(value: float, key: str) -> None:
    require(0.0 <= value <= 1.0, key, f"must lie in [0, 1], got {value}")


def check_positive(value: float, key: str, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    require(ok, key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclasses.dataclass(frozen=True)
class Scalar:
    """An unquoted YAML scalar that YAML 1.1 reads as a non-string (``0123`` -> 83, ``1.10`` -> 1.1, ``no`` ->
    False): both readings are kept, so a string field gets the ``text`` the user typed and any other field the
    ``value``."""

    value: Any
    text: str


def read_yaml(text: str) -> Any:
    """YAML as :func:`yaml.safe_load` reads it, except that unquoted non-string scalars become :class:`Scalar`."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    loader = yaml.SafeLoader("")

    def build(node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # YAML merge keys (<<)
            return {loader.construct_object(k, deep=True): build(v) for k, v in node.value}
        if isinstance(node, yaml.SequenceNode):
            return [build(item) for item in node.value]
        value = loader.construct_object(node, deep=True)
        if node.style is None and value is not None and not isinstance(value, str):
            return Scalar(value, node.value)
        return value

    return None if node is None else build(node)


def _literal_text(value: Any, wants_text: bool) -> Any:
    if isinstance(value, Scalar):
        return value.text if wants_text else value.value
    return value


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Coerce a YAML value to the field's type, or fail naming the key."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, Scalar):
            value = value.text if value.text in choices else value.value
        require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        value = _literal_text(value, item_type is str)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        require(isinstance(value, list | tuple), key, f"must be a list, got {value!r}")
        return tuple(_check_value(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        value = _literal_text(value, False)
        value = {} if value == "" else value  # `key=` on the command line: empty
        require(isinstance(value, dict), key, f"must be a mapping such as {{name: value}}, got {value!r}")
        return {
            _check_value(k, key_type, f"{key} (a key)"): _check_value(v, value_type, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union annotation for {key}")
    value = _literal_text(value, annotation is str)
    if annotation is bool:
        require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        require(isinstance(value, int | float) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(sorted(names))}"
        raise ConfigError(f"{key}: unknown config key; {hint}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(annotation):
            require(isinstance(value, dict), key, f"must be a mapping of {annotation.__name__} fields")
            kwargs[name] = build_dataclass(annotation, value, f"{key}.")
        else:
            kwargs[name] = _check_value(value, annotation, key)
    instance = cls(**kwargs)
    instance.validate()
    return instance


def merge(base: dict, delta: dict) -> dict:
    merged = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """``"train.epochs=3"`` -> ``{"train": {"epochs": 3}}`` (the value is read as YAML; see :func:`read_yaml`)."""
    if "=" not in text:
        raise ConfigError(f"{text}: overrides take the form key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    require(bool(key) and all(key.split(".")), text, "the key before '=' is empty")
    try:
        value = read_yaml(raw) if raw else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: value {raw!r} is not valid YAML ({error})") from error
    if value is None:
        value = ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def to_dict(config: Any) -> dict:
    """A config as plain YAML-able data (tuples become lists)."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple | list):
            return [plain(v) for v in obj]
        return obj

    return plain(config)
