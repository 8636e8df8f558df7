"""`personalize <command>`: one entry point for every stage and tool.

Every stage takes the same form: ``personalize STAGE --config configs/demo.yaml key=value ...``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from pipelines.stages import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: personalize COMMAND [--config FILE] [key=value ...]",
        "       personalize --address http://HEAD:8265 [--no-follow] COMMAND ...   (submit as a Ray Job)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `personalize COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0].split("=")[0] in ("--address", "--no-follow", "--runtime-env", "--working-dir", "--insecure"):
        # `personalize --address URL COMMAND ...`: submit the command as a Ray Job and follow its logs.
        return int(importlib.import_module("pipelines.jobs").main(argv))
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"personalize: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipelines.{COMMANDS[command][0]}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
