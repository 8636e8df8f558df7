"""`personalize compare OUT1 OUT2 ... [--out FILE.md]`: runs side by side as the paper's tables (mean +- sd over
each run's seeds, per metric and test split), printed as Markdown; with ``--out``, also written there and as an
HTML page beside it (same name, ``.html``) with the runs' PR curves overlaid. No Ray (personalization/compare.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from personalization.compare import load_run, render_markdown, write_comparison
from pipelines.common import user_errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="personalize compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="OUT", help="output_dir of a `personalize run` (seed-<s>/ inside)")
    parser.add_argument("--out", help="write the Markdown here (e.g. comparison.md) and the HTML page beside it")
    args = parser.parse_args(argv)
    with user_errors("compare"):
        runs = [load_run(folder) for folder in args.runs]
        print(render_markdown(runs), end="")
        if args.out:
            markdown, page = write_comparison(runs, args.out)
            print(f"\ncompare: wrote {markdown} and {page}")
    return 0
