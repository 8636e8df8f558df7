import dataclasses

import pytest

from personalization.config import (
    ConfigError,
    ExperimentConfig,
    build_config,
    load_config,
    parse_override,
    replace,
    save_config,
    to_dict,
)


def test_defaults_follow_the_reference_settings():
    cfg = ExperimentConfig()
    assert cfg.model.lora_r == 16 and cfg.model.lora_alpha == 0.5 and cfg.model.lora_dropout == 0.3
    assert cfg.train.temperature == 0.07 and cfg.train.learning_rate == 3e-4 and cfg.train.batch_size == 16
    assert (cfg.train.beta1, cfg.train.beta2) == (0.5, 0.999)
    assert cfg.train.num_triplets == 4500 and cfg.train.epochs == 2
    assert cfg.generate.guidance_scale == 5.0 and cfg.filter.threshold == 0.6 and cfg.dreambooth.steps == 400


def test_configs_are_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3


def test_yaml_deltas_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\ntrain:\n  epochs: 5\n  loss: hinge\nmodel:\n  backbone: mobilenetv2\n")
    cfg = load_config(path, ["train.epochs=7", "evaluate.tasks=[classification]", "seed=3"])
    assert cfg.name == "exp" and cfg.seed == 3
    assert cfg.train.epochs == 7 and cfg.train.loss == "hinge"  # override wins, yaml delta kept
    assert cfg.model.backbone == "mobilenetv2" and cfg.model.lora_r == 16  # untouched defaults survive
    assert cfg.evaluate.tasks == ("classification",)


def test_override_values_are_typed():
    assert build_config(parse_override("train.learning_rate=1e-3")).train.learning_rate == 1e-3
    assert parse_override("data.instances=a,b") == {"data": {"instances": "a,b"}}
    cfg = build_config(parse_override("data.instances=a,b"), parse_override("train.temperature=1"))
    assert cfg.data.instances == ("a", "b")
    assert cfg.train.temperature == 1.0 and isinstance(cfg.train.temperature, float)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epocs=3", "train.epocs: unknown config key; did you mean train.epochs?"),
        ("bogus=1", "bogus: unknown config key"),
        ("train.epochs=two", "train.epochs: must be an integer"),
        ("train.epochs=1.5", "train.epochs: must be an integer"),
        ("train.augment=maybe", "train.augment: must be true or false"),
        ("train.learning_rate=fast", "train.learning_rate: must be a number"),
        ("train.loss=mse", "train.loss: must be one of"),
        ("train.num_triplets=-5", "train.num_triplets: must be > 0"),
        ("train.num_negatives=-1", "train.num_negatives: must be >= 0"),
        ("train.zero_stage=3", "train.zero_stage: DeepSpeed ZeRO stage must be 1 or 2"),
        ("train.positive_sources=[photos]", "train.positive_sources: 'photos' is not one of"),
        ("train.negatives=folder", "train.negatives_dir: negatives=folder needs"),
        ("filter.threshold=1.5", "filter.threshold: must lie in [0, 1]"),
        ("filter.threshold=-0.1", "filter.threshold: must lie in [0, 1]"),
        ("generate.guidance_scale=0.5", "generate.guidance_scale: classifier-free guidance must be >= 1"),
        ("data.root=/no/such/dir", "data.root: /no/such/dir does not exist"),
        ("cutpaste.scale_max=0.1", "cutpaste.scale_max: must be >= cutpaste.scale_min"),
        ("cutpaste.backgrounds_dir=/no/such", "cutpaste.backgrounds_dir: /no/such is not a folder"),
        ("evaluate.tasks=[counting]", "evaluate.tasks: 'counting' is not one of"),
        ("model.lora_dropout=1.0", "model.lora_dropout: must lie in [0, 1)"),
        ("dreambooth.resolution=500", "dreambooth.resolution: must be a multiple of 8"),
        ("filter.masker=sam", "filter.sam_weights: masker=sam needs"),
        ("train=3", "train: must be a mapping"),
        ("train.epochs", "overrides take the form key=value"),
    ],
)
def test_every_bad_value_names_the_key_and_the_fix(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert expected in str(error.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "data.instances=[x,y]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert to_dict(cfg)["data"]["instances"] == ["x", "y"]


def test_replace_with_dotted_keys_validates():
    cfg = replace(ExperimentConfig(), **{"train.epochs": 9, "name": "z"})
    assert cfg.train.epochs == 9 and cfg.name == "z"
    with pytest.raises(ConfigError, match="filter.threshold"):
        replace(cfg, **{"filter.threshold": 2.0})


def test_shipped_configs_parse():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert configs, "configs/ ships at least configs/demo.yaml"
    for path in configs:
        load_config(path)


def test_a_worker_rebuilds_the_drivers_config_without_seeing_its_folders(tmp_path):
    """A Ray worker on another node rebuilds the driver's config: data.root and the other local folders need not
    exist there, every other rule still holds."""
    from personalization.config import rebuild_config

    root, negatives = tmp_path / "data", tmp_path / "negatives"
    root.mkdir(), negatives.mkdir()
    train = {"negatives": "folder", "negatives_dir": str(negatives)}
    values = to_dict(build_config({"data": {"root": str(root)}, "train": train}))
    root.rmdir(), negatives.rmdir()  # as seen from a node without the driver's disks
    with pytest.raises(ConfigError, match="data.root"):
        build_config(values)
    rebuilt = rebuild_config(values)
    assert rebuilt.data.root == str(root) and rebuilt.train.negatives_dir == str(negatives)
    with pytest.raises(ConfigError, match="train.epochs"):
        rebuild_config(values, {"train": {"epochs": 0}})
    with pytest.raises(ConfigError, match="data.root"):  # the driver's own checks are back after it
        build_config(values)
