"""The config owns its rules: renamed keys fail naming the new one, cross-section rules refuse a config when it is
built (whichever command builds it), and the path fields are the ones marked on the dataclass fields."""

import pytest

from personalization.config import ConfigError, build_config, load_config
from personalization.sweeps import parse_space


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
