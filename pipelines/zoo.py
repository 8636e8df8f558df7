"""``personalize zoo --out DIR``: build the offline model zoo (tiny random models in real layouts) and print paths."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from personalization.zoo import PARTS, build_zoo, mobilenetv2_weights
from pipelines.common import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="personalize zoo", description=__doc__)
    parser.add_argument("--out", required=True, help="folder to build the zoo in (parts already built are reused)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None, help="build only these parts")
    args = parser.parse_args(argv)
    setup_logging()
    for part, path in build_zoo(args.out, args.parts).items():
        print(f"{part}: {path}")
    try:
        print(f"mobilenetv2: {mobilenetv2_weights()}")
    except FileNotFoundError as error:
        print(f"mobilenetv2: unavailable ({error})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
