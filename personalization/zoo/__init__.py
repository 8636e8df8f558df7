"""The offline model zoo: tiny random models in real layouts, built once, for tests and the CPU demo.

``build_zoo(out_dir)`` returns ``{part: folder}`` for the parts ``dinov2``, ``clip``, ``mae`` (this package's
``vision`` module), ``sam`` (``zoo.sam``: a ``SamModel`` and its processor, for ``filter.sam_weights``),
``stable_diffusion`` (``zoo.diffusion.build_stable_diffusion``) and ``dreamsim``
(``zoo.dreamsim.build_dreamsim_cache``). Point the config at them, e.g. ``model.weights=<zoo>/dinov2``,
``dreambooth.base_model=<zoo>/stable_diffusion``. ``mobilenetv2_weights()`` is the one real pretrained backbone.

Caching: a built part holds a ``_zoo_done.json`` marker written last; a part with the marker is returned at once.
Vision and SAM parts are built in a temporary sibling folder and renamed into place, so a crash leaves no half part.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from personalization.errors import UserError
from personalization.zoo.sam import build_tiny_sam
from personalization.zoo.vision import VISION_BUILDERS, mobilenetv2_weights

log = logging.getLogger(__name__)

MARKER = "_zoo_done.json"
PARTS = ("dinov2", "clip", "mae", "sam", "stable_diffusion", "dreamsim")
# Parts built here into a temporary sibling folder and renamed into place (transformers save_pretrained folders).
LOCAL_BUILDERS = {**VISION_BUILDERS, "sam": build_tiny_sam}

__all__ = ["MARKER", "PARTS", "build_zoo", "mobilenetv2_weights"]


def _external_builder(part: str) -> Callable[[Path], Path] | None:
    """The builders other modules own, imported lazily (they may pull in diffusers / dreamsim, or not exist)."""
    try:
        if part == "stable_diffusion":
            from personalization.zoo.diffusion import build_stable_diffusion

            return build_stable_diffusion
        from personalization.zoo.dreamsim import build_dreamsim_cache

        return build_dreamsim_cache
    except ImportError as error:
        log.warning("zoo: skipping %s (%s)", part, error)
        return None


def _read_marker(folder: Path) -> Path | None:
    marker = folder / MARKER
    return Path(json.loads(marker.read_text())["path"]) if marker.is_file() else None


def _write_marker(folder: Path, path: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"path": str(path)}))


def _build_vision(part: str, out_dir: Path) -> Path:
    final = out_dir / part
    if final.exists():  # no marker: leftovers of a crash
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=out_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the zoo is shared read-only
    try:
        LOCAL_BUILDERS[part](tmp)
        _write_marker(tmp, final)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same part first: use theirs
            if _read_marker(final) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_zoo(out_dir: str | Path, parts: Sequence[str] | None = None) -> dict[str, Path]:
    """Build (or find) each of ``parts`` (default: all of ``PARTS``) under ``out_dir``; returns ``{part: path}``.

    A part whose builder cannot be imported is skipped with a logged note (it is absent from the result).
    """
    out_dir = Path(out_dir)
    parts = list(PARTS if parts is None else parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise UserError(f"unknown zoo parts {unknown}; choose from {list(PARTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for part in parts:
        cached = _read_marker(out_dir / part)
        if cached is not None:
            paths[part] = cached
        elif part in LOCAL_BUILDERS:
            log.info("zoo: building %s", part)
            paths[part] = _build_vision(part, out_dir)
        elif (builder := _external_builder(part)) is not None:
            log.info("zoo: building %s", part)
            # Their builders take the zoo root and choose their own folder; the marker records where it went.
            paths[part] = Path(builder(out_dir))
            _write_marker(out_dir / part, paths[part])
    return paths
