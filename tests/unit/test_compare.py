"""`personalize compare`: mean +- sd over seeds against numpy by hand, the tables and page it writes through the
real CLI on runs laid out as `personalize run` writes them, and its error for a folder without metrics."""

import json
import math
import re

import numpy as np
import pytest

from personalization.compare import compute_mean_pr_curve, compute_mean_sd, load_run, split_stats
from personalization.config import ConfigError, build_config
from pipelines import cli

SPLITS = ("in_distribution", "pose")


def write_seed(folder, pr_auc, ndcg, split_pr_auc):
    """An OUT/evaluate/ as evaluate writes it: metrics.json (pooled, per_instance, per_split) and pr_curves.json."""
    evaluate = folder / "evaluate"
    evaluate.mkdir(parents=True)
    metrics = {
        "pretrained": {"classification/pr_auc": 0.3, "retrieval/ndcg": 0.6},
        "personalized": {"classification/pr_auc": pr_auc, "retrieval/ndcg": ndcg},
        "per_instance": {"mug_01": {}},
        "per_split": {
            model: {s: {"classification/pr_auc": v} for s, v in zip(SPLITS, values, strict=True)}
            for model, values in (("pretrained", (0.35, 0.25)), ("personalized", split_pr_auc))
        },
    }
    (evaluate / "metrics.json").write_text(json.dumps(metrics))
    curve = {"precision": [0.5, 1.0, 1.0], "recall": [1.0, 0.5, 0.0]}
    (evaluate / "pr_curves.json").write_text(json.dumps({"pretrained": {"mug_01": curve}, "personalized": {}}))


@pytest.fixture
def runs(tmp_path):
    """Run a: three seeds (seed-0, seed-1, seed-2); run b: one seed (a plain run)."""
    seeds = {0: (0.40, 0.70, (0.5, 0.3)), 1: (0.45, 0.75, (0.6, math.nan)), 2: (0.53, 0.71, (0.4, 0.2))}
    for seed, values in seeds.items():
        write_seed(tmp_path / "a" / f"seed-{seed}", *values)
    (tmp_path / "a" / "seed-3").mkdir()  # a seed that never finished: left out, and said so
    write_seed(tmp_path / "b", 0.61, 0.80, (0.7, 0.5))
    return tmp_path, seeds


def test_mean_sd_over_seeds_match_numpy(runs):
    root, seeds = runs
    run = load_run(root / "a")
    assert run.seeds == ["seed-0", "seed-1", "seed-2"] and run.missing == ["seed-3"]
    pr_auc = np.array([v[0] for v in seeds.values()])
    mean, sd, count = compute_mean_sd(m["personalized"]["classification/pr_auc"] for m in run.metrics)
    assert (mean, count) == (pytest.approx(pr_auc.sum() / 3), 3)
    assert sd == pytest.approx(math.sqrt(((pr_auc - pr_auc.mean()) ** 2).sum() / 2))  # sample sd, ddof 1
    mean, sd, count = split_stats(run, "personalized", "pose", "classification/pr_auc")  # seed 1's NaN left out
    assert (mean, sd, count) == (pytest.approx(0.25), pytest.approx(math.sqrt(0.05**2 * 2)), 2)
    assert compute_mean_sd([0.4])[2] == 1 and math.isnan(compute_mean_sd([0.4])[1])
    assert compute_mean_sd([math.nan])[2] == 0
    chosen = load_run(root / "a", only=["seed-0", "seed-2"])  # a seeds run reads its own seeds, not stale ones
    assert chosen.seeds == ["seed-0", "seed-2"] and chosen.missing == []
    assert compute_mean_sd(m["personalized"]["classification/pr_auc"] for m in chosen.metrics)[0] == pytest.approx(
        0.465
    )


def test_run_seeds_config_names_the_fix():
    assert build_config({"run": {"seeds": [0, 1, 2]}}).run.seeds == (0, 1, 2)
    with pytest.raises(ConfigError, match=r"run.seeds: holds a seed twice: \[1, 1\]"):
        build_config({"run": {"seeds": [1, 1]}})
    with pytest.raises(ConfigError, match="run.seeds: must be >= 0"):
        build_config({"run": {"seeds": [-1]}})


def test_mean_pr_curve_is_the_interpolated_precision():
    curve = {"precision": [0.5, 2 / 3, 1.0, 1.0], "recall": [1.0, 1.0, 0.5, 0.0]}  # ranking: +, -, +
    mean = compute_mean_pr_curve([curve, {"precision": [1.0, 1.0], "recall": [1.0, 0.0]}])
    assert mean[0] == 1.0 and mean[50] == 1.0  # recall <= 0.5: precision 1 on both
    assert mean[51] == pytest.approx((2 / 3 + 1.0) / 2) and mean[100] == pytest.approx((2 / 3 + 1.0) / 2)


def test_compare_through_the_cli_writes_markdown_and_html(runs, capsys):
    root, seeds = runs
    out = root / "report" / "comparison.md"
    assert cli.main(["compare", str(root / "a"), str(root / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    markdown = out.read_text()
    assert markdown in printed and f"wrote {out} and {out.with_suffix('.html')}" in printed
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in markdown.splitlines()}
    pr_auc = np.array([v[0] for v in seeds.values()])
    ndcg = np.array([v[1] for v in seeds.values()])
    expected = f"| {pr_auc.mean():.3f} ± {pr_auc.std(ddof=1):.3f} | {ndcg.mean():.3f} ± {ndcg.std(ddof=1):.3f} |"
    assert rows[(str(root / "a"), "3", "personalized")].endswith(expected)
    assert rows[(str(root / "a"), "3", "pretrained")].endswith("| 0.300 ± 0.000 | 0.600 ± 0.000 |")
    assert rows[(str(root / "b"), "1", "personalized")].endswith("| 0.610 | 0.800 |")  # one seed: no sd
    assert "| run | seeds | encoder | classification/pr_auc | retrieval/ndcg |" in markdown
    assert "## classification/pr_auc per test split (mean ± sd over seeds)" in markdown
    assert "| run | encoder | in_distribution | pose |" in markdown
    assert f"| {root / 'a'} | personalized | 0.500 ± 0.100 | 0.250 ± 0.071 |" in markdown
    assert "without metrics, left out: seed-3" in markdown
    page = out.with_suffix(".html").read_text()
    assert "<td>0.610</td>" in page and "pose" in page
    assert re.search(
        r"Classification precision-recall</h2><img alt=\"mean PR curves\" src=\"data:image/png;base64,", page
    )


def test_compare_names_the_folder_without_metrics(runs, capsys):
    root, _ = runs
    (root / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", str(root / "b"), str(root / "empty")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{root / 'empty'}: no metrics to compare" in err and "personalize run" in err
    with pytest.raises(SystemExit):
        cli.main(["compare", str(root / "b"), "--out", str(root / "x.html")])
    assert "name the Markdown file" in capsys.readouterr().err
