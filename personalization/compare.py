"""Several runs side by side, laid out like the paper's tables: mean +- sd over each run's seeds.

A run is a folder `personalize run` wrote. Its seeds are its ``seed-<s>/`` sub-runs (``run.seeds``), each read
as one seed, or else the folder itself as a single seed. A seed's metrics come from the first of
``evaluate/metrics.json``, ``metrics.json`` (an evaluate folder) and ``summary.json`` that exists; its PR curves
from the ``pr_curves.json`` beside the metrics, when there is one.

For a metric key (``classification/pr_auc``, ...) and encoder (pretrained / personalized), a seed's value is
its mean over instances (``metrics.json``); the table shows ``mean +- sd`` over the run's seeds, the sample sd
(ddof 1; only the mean with one seed), NaN values left out. ``per_split`` tables do the same per test split.
The PR-curve plot overlays one curve per run and encoder: the interpolated precision
``p(r) = max{precision_i : recall_i >= r}`` on a recall grid of 101 points, averaged over instances and seeds.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personalization.errors import UserError

MODELS = ("pretrained", "personalized")
METRIC_FILES = ("evaluate/metrics.json", "metrics.json", "summary.json")
RECALL_GRID = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class RunResults:
    """One run: its label (the folder as given) and, per seed, the metrics (``{model: {key: mean}, "per_split":
    {...}}``) and PR curves."""

    label: str
    folder: Path
    seeds: list[str]  # "seed-0", ... or "" for a single-seed run
    metrics: list[dict]
    curves: list[dict]  # pr_curves.json per seed ({model: {instance: {"precision", "recall"}}}; {} when absent)
    missing: list[str]  # seed-<s>/ sub-runs without metrics (left out, and said so)


def read_seed(folder: Path) -> tuple[dict, dict] | None:
    """(metrics, curves) of one seed folder, or None when it holds no measured metrics."""
    for name in METRIC_FILES:
        path = folder / name
        if not path.is_file():
            continue
        found = json.loads(path.read_text())
        if name == "summary.json":
            found = {**found.get("metrics", {}), "per_split": found.get("per_split", {})}
        if not any(found.get(model) for model in MODELS):  # nothing measured (e.g. only skipped instances)
            continue
        curves_path = path.parent / "pr_curves.json"
        return found, json.loads(curves_path.read_text()) if curves_path.is_file() else {}
    return None


def _seed_number(folder: Path) -> int:
    match = re.fullmatch(r"seed-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def load_run(folder: str | Path, only: Sequence[str] | None = None) -> RunResults:
    """The seeds of the run in ``folder`` (see the module docstring; ``only``: these ``seed-<s>`` sub-runs, not
    every one there); a UserError naming the folder when it has none with metrics."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass the output_dir of a `personalize run`")
    sub_runs = sorted((p for p in folder.iterdir() if _seed_number(p) >= 0 and p.is_dir()), key=_seed_number)
    sub_runs = [p for p in sub_runs if only is None or p.name in only]
    found = [(p.name, read_seed(p)) for p in sub_runs]
    seeds = [(name, seed) for name, seed in found if seed is not None]
    if not sub_runs and (single := read_seed(folder)) is not None:
        seeds = [("", single)]
    if not seeds:
        looked = ", ".join(METRIC_FILES)
        raise UserError(
            f"{folder}: no metrics to compare (looked for {looked}, in the folder and in its seed-<s>/ "
            f"sub-runs); run `personalize run` (or `personalize evaluate`) with output_dir={folder} first"
        )
    return RunResults(
        label=str(folder),
        folder=folder,
        seeds=[name for name, _ in seeds],
        metrics=[seed[0] for _, seed in seeds],
        curves=[seed[1] for _, seed in seeds],
        missing=[name for name, seed in found if seed is None],
    )


def compute_mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample sd with ddof 1, count) of the values that are not NaN; sd is NaN for fewer than 2."""
    finite = [float(v) for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, 0
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), sd, len(finite)


def _ordered(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def metric_keys(runs: Sequence[RunResults]) -> list[str]:
    """The pooled metric keys of all runs, in the order evaluate wrote them."""
    return _ordered(k for run in runs for m in run.metrics for model in MODELS for k in m.get(model, {}))


def split_names(runs: Sequence[RunResults]) -> list[str]:
    return _ordered(
        s for run in runs for m in run.metrics for model in MODELS for s in m.get("per_split", {}).get(model, {})
    )


def split_keys(runs: Sequence[RunResults]) -> list[str]:
    return _ordered(
        k
        for run in runs
        for m in run.metrics
        for model in MODELS
        for by_split in m.get("per_split", {}).get(model, {}).values()
        for k in by_split
    )


def pooled_stats(run: RunResults, model: str, key: str) -> tuple[float, float, int]:
    return compute_mean_sd(m.get(model, {}).get(key, math.nan) for m in run.metrics)


def split_stats(run: RunResults, model: str, split: str, key: str) -> tuple[float, float, int]:
    return compute_mean_sd(m.get("per_split", {}).get(model, {}).get(split, {}).get(key, math.nan) for m in run.metrics)


def format_stat(stat: tuple[float, float, int]) -> str:
    """``0.431 ± 0.012`` (one seed: ``0.431``; nothing measured: ``n/a``)."""
    mean, sd, count = stat
    if count == 0:
        return "n/a"
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def build_tables(runs: Sequence[RunResults]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The comparison as (title, header, rows) tables: pooled metrics, then one table per per-split metric."""
    keys = metric_keys(runs)
    header = ["run", "seeds", "encoder", *keys]
    rows = [
        [run.label, str(len(run.metrics)), model, *(format_stat(pooled_stats(run, model, k)) for k in keys)]
        for run in runs
        for model in MODELS
    ]
    tables = [("Pooled test set (mean over instances; mean ± sd over seeds)", header, rows)]
    splits = split_names(runs)
    for key in split_keys(runs):
        rows = [
            [run.label, model, *(format_stat(split_stats(run, model, s, key)) for s in splits)]
            for run in runs
            for model in MODELS
        ]
        tables.append((f"{key} per test split (mean ± sd over seeds)", ["run", "encoder", *splits], rows))
    return tables


def render_markdown(runs: Sequence[RunResults]) -> str:
    """The comparison as Markdown tables."""
    lines = [f"# Comparison of {len(runs)} run(s)", ""]
    for run in runs:
        seeds = ", ".join(run.seeds) if run.seeds != [""] else "one seed"
        missing = f"; without metrics, left out: {', '.join(run.missing)}" if run.missing else ""
        lines.append(f"- {run.label} ({seeds}{missing})")
    for title, header, rows in build_tables(runs):
        align = ["---" if name in ("run", "encoder") else "---:" for name in header]
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compute_mean_pr_curve(curves: Sequence[dict]) -> np.ndarray:
    """(101,) interpolated precision on ``RECALL_GRID`` averaged over ``curves`` ({"precision", "recall"})."""
    rows = []
    for curve in curves:
        precision, recall = np.asarray(curve["precision"], float), np.asarray(curve["recall"], float)
        rows.append([precision[recall >= r].max() if (recall >= r).any() else 0.0 for r in RECALL_GRID])
    return np.mean(rows, axis=0)


def plot_pr_curves(runs: Sequence[RunResults]) -> bytes | None:
    """PNG of each run's mean PR curve (personalized solid, pretrained dashed); None without curves."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from personalization.evaluation.report import _figure_png

    figure, axis = plt.subplots(figsize=(6, 4.5))
    drawn = 0
    for index, run in enumerate(runs):
        for model, style in (("personalized", "-"), ("pretrained", "--")):
            curves = [c for seed in run.curves for c in seed.get(model, {}).values()]
            if curves:
                axis.plot(RECALL_GRID, compute_mean_pr_curve(curves), style, color=f"C{index}",
                          label=f"{run.label} {model}")  # fmt: skip
                drawn += 1
    png = None
    if drawn:
        axis.set(xlabel="recall", ylabel="interpolated precision", xlim=(0, 1.02), ylim=(0, 1.02))
        axis.set_title("Classification PR curves (mean over instances and seeds)")
        axis.legend(fontsize="small")
        png = _figure_png(figure)
    plt.close(figure)
    return png


def render_html(runs: Sequence[RunResults]) -> str:
    """One self-contained page: the tables of :func:`build_tables` and the overlaid PR curves."""
    from personalization.evaluation.report import _STYLE, _png_tag

    body = [f"<h1>Comparison of {len(runs)} run(s)</h1><ul>"]
    body += [f"<li>{html.escape(run.label)} ({len(run.metrics)} seed(s))</li>" for run in runs]
    body.append("</ul>")
    for title, header, rows in build_tables(runs):
        cells = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
        cells += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        body += [f"<h2>{html.escape(title)}</h2>", f"<table>{''.join(cells)}</table>"]
    if (png := plot_pr_curves(runs)) is not None:
        body += ["<h2>Classification precision-recall</h2>", _png_tag(png, "mean PR curves")]
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Comparison</title><style>{_STYLE}</style>"
        f"</head><body>{''.join(body)}</body></html>"
    )


def write_comparison(runs: Sequence[RunResults], markdown_path: str | Path) -> tuple[Path, Path]:
    """``markdown_path`` (the Markdown) and the HTML page beside it (same name, ``.html``)."""
    markdown_path = Path(markdown_path)
    if markdown_path.suffix == ".html":
        raise UserError(f"--out {markdown_path}: name the Markdown file (e.g. comparison.md); the page goes beside it")
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(render_markdown(runs))
    html_path = markdown_path.with_suffix(".html")
    html_path.write_text(render_html(runs))
    return markdown_path, html_path
