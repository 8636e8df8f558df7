"""`personalize run` with ``run.seeds``: the data stages once, then train and evaluate once per seed.

The seed of a repeat is the train seed (triplet draw, LoRA initialization, augmentation, batch order): the data
stages (ingest, dreambooth, generate, cutpaste, and filter when present) are made once, with the config's
``seed``, and every repeat reads the same ones. Layout::

    OUT/config.yaml, OUT/<data stage>/       the data stages, shared
    OUT/seed-<s>/<data stage>                links to ../<data stage>, so the stages read them as usual
    OUT/seed-<s>/train/, evaluate/           this seed's encoders and metrics
    OUT/seed-<s>/summary.json, report.html   a run's usual summary and report; config.yaml has seed = s
    OUT/summary.json                         ``seeds``, ``runs`` ({seed: "seed-<s>"}), ``failed`` ({seed: {...}}),
                                             ``metrics`` / ``metrics_sd`` ({model: {key: mean / sd over seeds}})
                                             and ``per_split`` / ``per_split_sd`` ({model: {split: {key: ...}}})
    OUT/comparison.md, OUT/report.html       `personalize compare OUT`'s tables and page (mean +- sd, PR curves)

To vary the generated data too, make one run per data seed (``seed=N``) and compare them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from personalization.artifacts import write_json_atomic
from personalization.compare import (
    MODELS,
    RunResults,
    load_run,
    metric_keys,
    pooled_stats,
    render_markdown,
    split_keys,
    split_names,
    split_stats,
    write_comparison,
)
from personalization.config import ExperimentConfig, replace, save_config
from personalization.errors import UserError
from pipelines import run as run_module
from pipelines.common import InstanceFailures, ray_session
from pipelines.report import build_report
from pipelines.stages import ORDER

SEEDED = ("train", "evaluate")  # the stages a train seed changes; the others are shared by the seeds
log = logging.getLogger("personalize.run")


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The single run of one seed: ``OUT/seed-<s>``, ``seed`` = s, no seeds of its own."""
    return replace(cfg, output_dir=str(Path(cfg.output_dir) / f"seed-{seed}"), seed=seed, **{"run.seeds": ()})


def link_shared(out: Path, folder: Path) -> None:
    """``folder/<stage>`` -> ``../<stage>`` for each shared stage folder of ``out`` (relative: OUT can move)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage in ORDER:
        link = folder / stage
        if stage in SEEDED or not (out / stage).is_dir() or link.is_symlink():
            continue
        if link.exists():
            raise UserError(f"{link}: a folder where run.seeds links the shared {stage} output; remove it and re-run")
        link.symlink_to(Path("..") / stage, target_is_directory=True)


def run_seeds(cfg: ExperimentConfig) -> Path:
    """The data stages in OUT, then each seed's train and evaluate in OUT/seed-<s>; the summaries and report."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stages = run_module.plan(cfg)
    failed, finished = {}, 0
    with ray_session(cfg):
        shared = run_module.run_stages(cfg, [s for s in stages if s[0] not in SEEDED], "")
        for seed in cfg.run.seeds:
            sub = seed_config(cfg, seed)
            link_shared(out, Path(sub.output_dir))
            save_config(sub, Path(sub.output_dir) / "config.yaml")
            timings = shared | run_module.run_stages(sub, [s for s in stages if s[0] in SEEDED], f"seed {seed} ")
            summary = run_module.write_summary(sub, timings)
            build_report(sub, summary)
            finished += len(summary["instances"])
            if summary["failed"]:
                failed[str(seed)] = summary["failed"]
    results = load_run(out, only=[f"seed-{s}" for s in cfg.run.seeds])  # not a stale seed-<s>/ of an older run
    summary = write_seeds_summary(cfg, results, shared, failed)
    markdown, page = write_comparison([results], out / "comparison.md")
    page.replace(out / "report.html")
    print(render_markdown([results]), end="")
    print(f"summary: {out / 'summary.json'}\ncomparison: {markdown}\nreport:  {out / 'report.html'}")
    if failed:
        listed = {f"seed {s}/{i}": f"{f['stage']}: {f['error']}" for s, by in failed.items() for i, f in by.items()}
        raise InstanceFailures("run", listed, finished=finished, listed_in=str(out / "summary.json"))
    return out


def write_seeds_summary(cfg: ExperimentConfig, run: RunResults, seconds: dict[str, float], failed: dict) -> dict:
    """``OUT/summary.json`` of a seeds run (module docstring): the seeds' means and sds, same shapes as a run's."""
    out = Path(cfg.output_dir)
    keys, splits, by_split = metric_keys([run]), split_names([run]), split_keys([run])
    stat = {model: {k: pooled_stats(run, model, k) for k in keys} for model in MODELS}
    split_stat = {model: {s: {k: split_stats(run, model, s, k) for k in by_split} for s in splits} for model in MODELS}
    summary = {
        "seeds": list(cfg.run.seeds),
        "runs": {str(s): f"seed-{s}" for s in cfg.run.seeds},
        "measured": run.seeds,
        "failed": failed,
        "backbone": cfg.model.backbone,
        "metrics": {m: {k: v[0] for k, v in stat[m].items()} for m in MODELS},
        "metrics_sd": {m: {k: v[1] for k, v in stat[m].items()} for m in MODELS},
        "seconds": seconds,
        "config": "config.yaml",
    }
    if splits:
        summary["per_split"] = {
            m: {s: {k: v[0] for k, v in d.items()} for s, d in split_stat[m].items()} for m in MODELS
        }
        summary["per_split_sd"] = {
            m: {s: {k: v[1] for k, v in d.items()} for s, d in split_stat[m].items()} for m in MODELS
        }
    write_json_atomic(out / "summary.json", summary)
    return summary
