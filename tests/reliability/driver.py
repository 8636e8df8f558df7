"""``python tests/reliability/driver.py HOLD_FILE COMMAND [ARGS...]``: the ``personalize`` CLI, except that train
workers hold at their 3rd step while HOLD_FILE exists (so a test can SIGKILL this driver mid-train, after the
first checkpoint). Without HOLD_FILE on disk it is exactly ``personalize COMMAND ARGS...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import faults  # noqa: E402

from pipelines import cli, train  # noqa: E402

HOLD_AT_STEP = 3

if __name__ == "__main__":
    hold, argv = sys.argv[1], sys.argv[2:]
    production_run = train.run

    def run_with_hold(cfg, build_model=None, **kwargs):
        return production_run(cfg, build_model=faults.DyingModel(None, HOLD_AT_STEP, pause_file=hold), **kwargs)

    train.run = run_with_hold
    sys.exit(cli.main(argv))
