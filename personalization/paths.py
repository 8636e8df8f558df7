"""Names that become output paths: one safe character set, checked where data enters and where paths are built.

Instance ids and categories come from a dataset's JSON, a folder name or the command line, and each becomes a
folder under ``output_dir`` (``OUT/train/<instance>``, ``OUT/generate/negatives/<category>``). Since a stage
replaces whatever folder it commits to, a name such as ``../../data`` or ``/home`` would make it delete a folder
outside the run. So names are checked twice: at ingest (:func:`check_name`, with the file and key in the error)
and at the one place that builds stage paths (:func:`inside`), so that no later code can escape ``output_dir``.

Also the one test of whether a model reference is a local path or a hub id (:func:`looks_local`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from personalization.errors import OutputPathError

# ASCII letters and digits first; then also '_', '-', '.', '+' and inner spaces (categories such as "water bottle").
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+ -]{0,127}")
NAME_RULE = (
    "up to 128 ASCII letters, digits, '_', '-', '.', '+' or spaces, starting with a letter or digit and not "
    "ending in '.' or a space"
)


def is_safe_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and NAME_PATTERN.fullmatch(name) is not None
        and not name.endswith((".", " "))
        and ".." not in name
    )


def check_name(name: object, where: str) -> str:
    """``name`` if it is a safe path component, else an :class:`OutputPathError` naming ``where`` and the rule."""
    if not isinstance(name, str):
        raise OutputPathError(f"{where}: must be a string, got {type(name).__name__} {name!r}; quote it")
    if not is_safe_name(name):
        raise OutputPathError(f"{where}: {name!r} cannot name an output folder; use {NAME_RULE}")
    return name


def slugify(name: str) -> str:
    """A safe name made from any text (a folder name such as ``My Mug (2024)`` -> ``My Mug _2024``)."""
    slug = re.sub(r"[^A-Za-z0-9_.+ -]+", "_", name).strip(" ._")
    slug = re.sub(r"\.{2,}", ".", slug)[:128].rstrip(" .")
    return slug if is_safe_name(slug) else "object"


def inside(root: str | Path, *parts: str) -> Path:
    """``root/parts...``, refusing a part that is empty, absolute, ``.``/``..`` or holds a path separator.

    The check is on the text (not ``resolve()``): folders linked in on purpose (a sweep links cached stage
    outputs) stay valid, and no part can step outside ``root`` whatever the links.
    """
    for part in parts:
        part = str(part)
        bad = (
            not part
            or part in (".", "..")
            or os.path.isabs(part)
            or "/" in part
            or (os.altsep is not None and os.altsep in part)
            or "\x00" in part
        )
        if bad:
            raise OutputPathError(
                f"{part!r} cannot be part of an output path under {root}: a name must be one folder name "
                f"({NAME_RULE}); check the dataset's instance ids and categories"
            )
    return Path(root).joinpath(*map(str, parts))


def looks_local(reference: str | Path) -> bool:
    """Whether a model reference names a local path (it exists, or starts with '/', '.' or '~') rather than a
    hub id such as ``facebook/dinov2-base``: a local one that is not what it should be is an error to report."""
    return str(reference).startswith(("/", ".", "~")) or Path(reference).expanduser().exists()
