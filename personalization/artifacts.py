"""Atomic, self-describing stage outputs.

A stage builds its output in a temporary sibling folder, renames it into place, and writes ``_manifest.json``
last. The manifest's ``hash`` covers the stage name, its config and the manifests of its inputs, so:

- same hash on disk -> the stage is skipped (re-running a finished stage is free);
- a folder without a manifest is the remains of a crash -> it is removed and the stage redone;
- a different hash -> the old output is replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from personalization.errors import MissingInputError
from personalization.schema import SCHEMA_VERSION

MANIFEST = "_manifest.json"
RESOLVED_CONFIG = "config.yaml"
log = logging.getLogger(__name__)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def hash_config(obj: Any) -> str:
    """sha256 of the canonical JSON of a config (dataclass, dict, list or scalar)."""
    blob = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a committed stage folder, or None when the folder is missing or incomplete."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def input_hash(path: str | Path) -> str:
    """The hash that identifies an input, read from manifests wherever there are some.

    A committed stage folder: its manifest hash. A folder of committed stage folders (``OUT/generate`` with
    ``positives/`` and ``negatives/<category>/``): a hash over its entries, each committed subfolder by its
    manifest hash, so generated data is never read back byte by byte. Anything else (a user's folder of
    negatives, a loose file): its content. Hidden entries (a crashed build's .tmp folders, scratch, the run
    lock) are not part of the content.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None:
        return manifest["hash"]
    if not path.exists():
        raise MissingInputError(f"stage input {path} does not exist; run the stage that makes it first")
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
        return digest.hexdigest()
    for entry in sorted(p for p in path.iterdir() if not p.name.startswith(".")):
        digest.update(entry.name.encode())
        digest.update(b"/" if entry.is_dir() else b":")
        digest.update(input_hash(entry).encode())
    return digest.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a part: a
    temporary sibling, fsynced, renamed over ``path``, then the folder fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders) to disk, so the manifest written after it never
    describes data still in the page cache when the machine goes down."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]:
        _fsync_dir(sub)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_stale(final_dir: str | Path) -> None:
    """Remove temporary folders left by a crashed build of ``final_dir``, and the folder itself if unmanifested."""
    final_dir = Path(final_dir)
    for leftover in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        log.info("removing leftover %s from an interrupted run", leftover)
        _remove(leftover)
    if final_dir.exists() and read_manifest(final_dir) is None:
        log.warning("%s has no manifest (an interrupted run): removing it and redoing the stage", final_dir)
        _remove(final_dir)


def stage_hash(stage: str, config: Any, inputs: Mapping[str, str | Path]) -> tuple[str, str, dict[str, str]]:
    config_hash = hash_config(config)
    input_hashes = {name: input_hash(path) for name, path in sorted(inputs.items())}
    key = hash_config({"stage": stage, "config": config_hash, "inputs": input_hashes, "schema": SCHEMA_VERSION})
    return key, config_hash, input_hashes


def is_current(final_dir: str | Path, stage: str, config: Any, inputs: Mapping[str, str | Path] = {}) -> bool:
    manifest = read_manifest(final_dir)
    return manifest is not None and manifest.get("hash") == stage_hash(stage, config, inputs)[0]


def commit_stage(
    final_dir: str | Path,
    stage: str,
    config: Any,
    build: Callable[[Path], int | None],
    *,
    inputs: Mapping[str, str | Path] = {},
    resolved_config: Mapping | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Build a stage output atomically, or skip it when an identical one is already committed.

    ``build(tmp_dir)`` writes everything into ``tmp_dir`` and returns the number of rows it wrote (or None).
    ``config`` is what the stage depends on (its hash decides skipping); ``resolved_config`` (the whole
    experiment config, as a dict) is saved as ``config.yaml`` beside the output.
    """
    final_dir = Path(final_dir)
    key, config_hash, input_hashes = stage_hash(stage, config, inputs)
    manifest = read_manifest(final_dir)
    if manifest is not None and manifest.get("hash") == key:
        log.info("%s: up to date at %s (hash %s), skipping", stage, final_dir, key[:12])
        return final_dir
    clean_stale(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)

    def install(tmp_dir: Path) -> None:
        if final_dir.exists():
            _remove(final_dir)
        os.replace(tmp_dir, final_dir)
        _fsync_dir(final_dir.parent)

    header = {"stage": stage, "hash": key, "config_hash": config_hash, "inputs": input_hashes}
    build_then_commit(final_dir, "tmp", build, install, header, resolved_config=resolved_config, extra=extra)
    return final_dir


def build_then_commit(
    final_dir: Path,
    scratch: str,
    build: Callable[[Path], int | None],
    install: Callable[[Path], None],
    manifest: Mapping[str, Any],
    *,
    resolved_config: Mapping | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """The commit shape every stage output shares: ``build(tmp)`` writes into a temporary sibling
    ``.<name>.<scratch>-*`` (the resolved config beside it), every file there is fsynced, ``install(tmp)`` renames
    it into ``final_dir``, and only then is ``_manifest.json`` written (``manifest`` plus ``rows``,
    ``schema_version``, ``created``, ``seconds`` and ``extra``). The scratch folder is gone afterwards, whatever
    happened."""
    tmp_dir = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.{scratch}-"))
    started = time.time()
    try:
        rows = build(tmp_dir)
        if resolved_config is not None:
            import yaml  # only stages that save a config pay for it

            (tmp_dir / RESOLVED_CONFIG).write_text(yaml.safe_dump(_jsonable(resolved_config), sort_keys=False))
        fsync_tree(tmp_dir)
        install(tmp_dir)
    finally:
        if tmp_dir.exists():
            _remove(tmp_dir)
    created = {"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    seconds = round(time.time() - started, 3)
    write_json_atomic(final_dir / MANIFEST, {**manifest, "rows": rows, **created, "seconds": seconds, **(extra or {})})
