"""The config owns its rules: renamed keys fail naming the new one, cross-section rules refuse a config when it is
built (whichever command builds it), and the path fields are the ones marked on the dataclass fields."""

from dataclasses import dataclass, field

import pytest

from personalization.config import ConfigError, build_config, load_config, path_field, path_fields
from personalization.sweeps import parse_space
from pipelines import train


def test_old_guidance_key_in_a_yaml_names_the_new_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("generate:\n  cfg: 7.5\n")
    with pytest.raises(ConfigError, match=r"^generate\.cfg: renamed to generate\.guidance_scale"):
        load_config(path)
    path.write_text("generate:\n  guidance_scale: 7.5\n")
    assert load_config(path).generate.guidance_scale == 7.5


def test_old_guidance_key_as_an_override_names_the_new_key():
    with pytest.raises(ConfigError, match=r"^generate\.cfg: renamed to generate\.guidance_scale"):
        load_config(None, ["generate.cfg=7.5"])
    assert load_config(None, ["generate.guidance_scale=7.5"]).generate.guidance_scale == 7.5


def test_old_guidance_key_in_a_sweep_space_names_the_new_key():
    with pytest.raises(ConfigError, match=r"^space\.yaml: generate\.cfg: renamed to generate\.guidance_scale"):
        parse_space({"generate.cfg": {"grid": [4.0, 7.5]}}, build_config(), source="space.yaml")
    space = parse_space({"generate.guidance_scale": {"grid": [4.0, 7.5]}}, build_config())
    assert space.domains["generate.guidance_scale"].values == (4.0, 7.5)


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        ({"cutpaste": {"enabled": False}}, "train.positive_sources has cutpaste but cutpaste.enabled=false"),
        (
            {"dreambooth": {"masked": False}, "train": {"positive_sources": ["dreambooth"]}},
            "train.positive_sources has dreambooth but generate.enabled=false",
        ),
        (
            {"generate": {"enabled": True}, "train": {"positive_sources": ["dreambooth"]}},
            "train.positive_sources has dreambooth but dreambooth.masked=True makes masked_dreambooth images",
        ),
        (
            {"generate": {"enabled": True, "negatives_per_category": 0}, "train": {"negatives": "generated"}},
            "train.negatives=generated needs generate.enabled=true and generate.negatives_per_category > 0",
        ),
        ({"model": {"backbone": "resnet9000"}}, "model.backbone: 'resnet9000' is not one of"),
    ],
)
def test_cross_section_rules_refuse_the_config_when_built(layer, expected):
    with pytest.raises(ConfigError) as error:
        build_config(layer)
    assert str(error.value).startswith(expected)


def test_agreeing_sections_build():
    cfg = build_config({"generate": {"enabled": True}, "train": {"positive_sources": ["masked_dreambooth", "real"]}})
    assert cfg.train.positive_sources == ("masked_dreambooth", "real")
    assert (
        build_config({"cutpaste": {"enabled": False}, "train": {"positive_sources": ["real"]}}).cutpaste.enabled
        is False
    )


def test_a_stage_run_alone_refuses_a_cross_section_mistake_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"output_dir={out}", "train.positive_sources=[dreambooth]"])
    assert exit_info.value.code == 2
    assert "train.positive_sources has dreambooth but generate.enabled=false" in capsys.readouterr().err
    assert not out.exists()


def test_path_fields_are_the_marked_ones():
    assert path_fields() == {
        "output_dir": "output",
        "data.root": "input",
        "model.weights": "input",
        "cutpaste.backgrounds_dir": "input",
        "dreambooth.base_model": "input",
        "generate.prompts_file": "input",
        "filter.cache_dir": "input",
        "filter.sam_weights": "input",
        "train.positives_dir": "input",
        "train.negatives_dir": "input",
    }


def test_path_fields_walk_any_nested_dataclass():
    @dataclass(frozen=True)
    class Inner:
        folder: str = path_field()
        name: str = ""

    @dataclass(frozen=True)
    class Outer:
        out: str = path_field("o", output=True)
        inner: Inner = field(default_factory=Inner)

    assert path_fields(Outer) == {"out": "output", "inner.folder": "input"}
