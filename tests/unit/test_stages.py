"""pipelines.stages: the one table the CLI, `personalize run` and failure tracking read."""

from __future__ import annotations

import importlib

from personalization.config import build_config
from pipelines import cli, run
from pipelines.stages import COMMANDS, ORDER, PER_INSTANCE, STAGES, TOOLS, per_instance_before, run_plan


def test_every_stage_is_a_command_with_run_and_main():
    for stage in STAGES:
        module = importlib.import_module(f"pipelines.{stage.module}")
        assert callable(module.run) and callable(module.main), stage.name
        assert stage.runner() is module.run
    assert list(COMMANDS) == [*ORDER, *TOOLS]
    assert all(f"  {name}  " in cli.usage() or f"  {name} " in cli.usage() for name in COMMANDS)


def test_run_plan_follows_the_config():
    plain = build_config({})
    assert [s.name for s in run_plan(plain)] == ["ingest", "cutpaste", "train", "evaluate"]
    generation = build_config({"dreambooth": {"enabled": True}, "generate": {"enabled": True}})
    names = [s.name for s in run_plan(generation)]
    assert names == ["ingest", "dreambooth", "generate", "cutpaste", "train", "evaluate"]  # never `filter`
    assert [name for name, _ in run.plan(generation)] == names
    assert PER_INSTANCE == ("dreambooth", "train", "evaluate")
    assert per_instance_before(plain, "evaluate") == ["train"]  # dreambooth off: its failures are not read
    assert per_instance_before(generation, "train") == ["dreambooth"]
    assert per_instance_before(generation, "report") == ["dreambooth", "train", "evaluate"]  # summary's "failed"


def test_unknown_command_lists_the_table(capsys):
    assert cli.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nope'" in err and all(name in err for name in COMMANDS)
