"""The project's own error types: what the command line reports as the user's to fix.

A :class:`UserError` (bad input, a bad config value, a stage run out of order) carries a message that names the
file or field and the fix; the CLI prints it and exits 2 without a traceback. Anything else is a bug: the CLI
lets it through with its traceback (exit 1).
"""

from __future__ import annotations


class UserError(ValueError):
    """Input, config or order of work that cannot go on as asked; the message names the file or field and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder a stage needs is absent (usually: an earlier stage has not run); the message says which."""


class OutputPathError(UserError):
    """A name would make an output path outside ``output_dir``, or is not a safe path component."""
