"""One run per output folder: an exclusive lock on ``OUT/.personalize.lock`` held for the whole command.

Two runs on one ``output_dir`` would corrupt each other: the second one's clean-up removes the first one's live
temporary folders, and a manifest can end up describing the other run's data. The lock is an ``flock`` on a file
that also records who holds it (host, pid, command, start time) for the message a second run gets. The kernel
drops the lock when its process dies, however it dies, so a stale lock from a killed run is taken over without
anyone deleting a file (on NFS/EFS the server's lock lease does the same). The lock is re-entrant within one
process: ``personalize run`` holds it and the stages it calls take it again for free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from personalization.errors import UserError

LOCK_FILE = ".personalize.lock"
_held: dict[str, int] = {}  # resolved output folder -> depth held by this process
_guard = threading.Lock()


class OutputDirInUse(UserError):
    """Another live run holds the output folder's lock; the message names it."""


def _describe(holder: dict) -> str:
    if not holder:
        return "another run (no details recorded)"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
        f"(`{holder.get('command', '?')}`)"
    )


@contextlib.contextmanager
def hold_output_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold ``output_dir``'s lock for the ``with`` block; :class:`OutputDirInUse` at once when a live run has it."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _guard:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield folder / LOCK_FILE
        finally:
            with _guard:
                _held[key] -= 1
        return
    path = folder / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the lock
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            raise OutputDirInUse(
                f"output_dir={folder} is in use by {_describe(holder)}; wait for that run to finish, or pass "
                "another output_dir=DIR (two runs on one folder would overwrite each other's stages)"
            ) from None
        handle.seek(0)
        handle.truncate()
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command[:300]}
        holder["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        handle.write(json.dumps(holder))
        handle.flush()
        with _guard:
            _held[key] = 1
        try:
            yield path
        finally:
            with _guard:
                _held.pop(key, None)
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def is_held_here(output_dir: str | Path) -> bool:
    """Whether this process holds ``output_dir``'s lock (stages that clean up check it)."""
    return bool(_held.get(str(Path(output_dir).resolve())))
