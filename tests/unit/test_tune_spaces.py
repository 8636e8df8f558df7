"""Every shipped search space parses and checks against the config schema; bad spaces fail naming the key."""

from pathlib import Path

import pytest
import yaml

from personalization.config import ConfigError, build_config, load_config
from personalization.sweeps import (
    best_row,
    generate_variants,
    load_space,
    nest,
    parse_space,
    plot_metric,
    save_best_delta,
    save_results_csv,
)

SPACES = Path(__file__).resolve().parents[2] / "tune_spaces"
EXPECTED = {
    "guidance_scale.yaml": "generate.guidance_scale",
    "negatives.yaml": "train.num_negatives",
    "pairs.yaml": "train.num_pairs",
    "loss.yaml": "train.loss",
    "learning_rate.yaml": "train.learning_rate",
    "filter_threshold.yaml": "filter.threshold",
}


@pytest.mark.parametrize("name", sorted(p.name for p in SPACES.glob("*.yaml")))
def test_every_shipped_space_checks_against_the_schema(name):
    base = build_config()
    space = load_space(SPACES / name, base)
    assert space.domains and space.metric == "val/pr_auc"
    for domain in space.domains.values():
        for value in domain.candidates():  # each candidate builds a valid config on top of the defaults
            built = build_config(nest({domain.key: value}))
            section, field = domain.key.split(".")
            assert getattr(getattr(built, section), field) == value


def test_the_issue_spaces_are_all_shipped():
    base = build_config()
    for name, key in EXPECTED.items():
        assert key in load_space(SPACES / name, base).domains
    assert load_space(SPACES / "guidance_scale.yaml", base).domains["generate.guidance_scale"].values == (4.0, 5.0, 7.5)


def test_unknown_key_names_the_key_and_the_valid_section_keys():
    with pytest.raises(ConfigError, match=r"'train\.learning_rte' is not a config field; valid train\.\* keys: .*"):
        parse_space({"train.learning_rte": {"grid": [1e-4]}}, build_config())
    with pytest.raises(ConfigError, match="learning_rate"):  # the message lists the valid keys
        parse_space({"train.learning_rte": {"grid": [1e-4]}}, build_config())
    with pytest.raises(ConfigError, match=r"'optimizer\.lr' is not a config field"):
        parse_space({"optimizer.lr": {"grid": [1e-4]}}, build_config())
    with pytest.raises(ConfigError, match=r"'cutpaste\.scale_min' is a config section the sweep shares"):
        parse_space({"cutpaste.scale_min": {"grid": [0.2]}}, build_config())


def test_invalid_candidate_values_fail_before_any_trial():
    with pytest.raises(ConfigError, match=r"generate\.guidance_scale=0\.5 is not a valid config value.*must be >= 1"):
        parse_space({"generate.guidance_scale": {"grid": [4.0, 0.5]}}, build_config())
    with pytest.raises(ConfigError, match=r"train\.loss='cosine'.*must be one of"):
        parse_space({"train.loss": {"choice": ["infonce", "cosine"]}}, build_config())
    with pytest.raises(ConfigError, match=r"filter\.threshold=1\.5"):
        parse_space({"filter.threshold": {"uniform": [0.5, 1.5]}}, build_config())
    with pytest.raises(ConfigError, match="low < high"):
        parse_space({"train.learning_rate": {"loguniform": [1e-3, 1e-5]}}, build_config())
    with pytest.raises(ConfigError, match="must be grid or choice"):
        parse_space({"generate.guidance_scale": {"uniform": [4.0, 7.5]}}, build_config())
    with pytest.raises(ConfigError, match="one domain"):
        parse_space({"train.epochs": [1, 2]}, build_config())
    with pytest.raises(ConfigError, match="option scheduler"):
        parse_space({"scheduler": "hyperband", "train.epochs": {"grid": [1, 2]}}, build_config())
    with pytest.raises(ConfigError, match="no swept keys"):
        parse_space({"metric": "val/pr_auc"}, build_config())


def test_options_and_generate_variants():
    space = parse_space(
        {"num_samples": 3, "max_concurrent_trials": 1, "generate.guidance_scale": {"grid": [4.0, 7.5]},
         "generate.steps": {"choice": [2, 3]}, "filter.threshold": {"grid": [0.4, 0.6]},
         "train.learning_rate": {"loguniform": [1e-5, 1e-3]}},
        build_config(),
    )  # fmt: skip
    assert space.num_samples == 3 and space.max_concurrent_trials == 1 and space.scheduler == "asha"
    # The threshold is read-time and the learning rate train-only: only guidance x steps change the generated data.
    assert space.generate_keys() == ["generate.guidance_scale", "generate.steps"]
    variants = generate_variants(space, build_config())
    assert sorted((v.generate.guidance_scale, v.generate.steps) for v in variants) == [
        (4.0, 2),
        (4.0, 3),
        (7.5, 2),
        (7.5, 3),
    ]


def test_results_table_best_delta_and_plots(tmp_path):
    space = parse_space({"train.loss": {"grid": ["infonce", "hinge"]}, "train.learning_rate": {"grid": [1e-4, 1e-3]}},
                        build_config())  # fmt: skip
    rows = [
        {"trial_id": "a", "train.loss": "infonce", "train.learning_rate": 1e-4, "val/pr_auc": 0.5, "status": "x"},
        {"trial_id": "b", "train.loss": "hinge", "train.learning_rate": 1e-3, "val/pr_auc": 0.9, "status": "x"},
        {"trial_id": "c", "train.loss": "hinge", "train.learning_rate": 1e-4, "val/pr_auc": float("nan")},
    ]
    assert best_row(rows, "val/pr_auc", "max")["trial_id"] == "b"
    assert best_row(rows, "val/pr_auc", "min")["trial_id"] == "a"
    save_results_csv(rows, tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("trial_id,train.loss")
    best = save_best_delta(rows[1], space, tmp_path / "best.yaml")
    assert yaml.safe_load(best.read_text()) == {"train": {"learning_rate": 1e-3, "loss": "hinge"}}
    cfg = load_config(best)
    assert cfg.train.loss == "hinge" and cfg.train.learning_rate == 1e-3
    plots = plot_metric(rows, space, tmp_path / "plots")
    assert sorted(p.name for p in plots) == ["train.learning_rate.png", "train.loss.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
