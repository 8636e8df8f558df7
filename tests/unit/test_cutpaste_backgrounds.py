"""cutpaste.backgrounds: which background set auto picks, the rules that refuse a config naming the key and the fix,
and the background prompts an LLM writes (against a real local HTTP server), asked once and kept. No Ray here."""

import json
from pathlib import Path

import pytest
from chat_server import ChatServer

from personalization.config import ConfigError, build_config, load_config
from personalization.synthesis.backgrounds import parse_background_prompts
from personalization.synthesis.llm import ENV_VARS, LLMError
from personalization.synthesis.prompts import make_background_prompts
from pipelines.cutpaste_backgrounds import LLM_PROMPTS, background_prompts, check_backgrounds, unit_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REPLY = "1. an empty wooden desk\n2. a bare tiled floor at night\n- an empty wooden desk\n\n* a quiet garden path"


def _source(layer: dict) -> str:
    cfg = build_config(layer)
    return cfg.cutpaste.background_source(cfg.generate.enabled)


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        ({}, "procedural"),  # generation off: no generator to sample from
        ({"generate": {"enabled": True}}, "generated"),  # the paper's
        ({"generate": {"enabled": True}, "cutpaste": {"backgrounds_dir": "."}}, "folder"),
        ({"generate": {"enabled": True}, "cutpaste": {"backgrounds": "procedural"}}, "procedural"),
        ({"cutpaste": {"backgrounds": "generated"}}, "generated"),  # the base model suffices
        ({"cutpaste": {"backgrounds": "folder", "backgrounds_dir": "."}}, "folder"),
    ],
)
def test_auto_picks_folder_then_generated_then_procedural(layer, expected):
    assert _source(layer) == expected


def test_demo_keeps_procedural_and_the_generation_demo_generates():
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.cutpaste.background_source(demo.generate.enabled) == "procedural"
    generation = load_config(CONFIGS / "demo_generation.yaml")
    assert generation.cutpaste.background_source(generation.generate.enabled) == "generated"


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (
            {"cutpaste": {"backgrounds": "folder"}},
            "cutpaste.backgrounds_dir: cutpaste.backgrounds=folder needs cutpaste.backgrounds_dir=DIR",
        ),
        (
            {"cutpaste": {"backgrounds": "procedural", "backgrounds_dir": "."}},
            "cutpaste.backgrounds: procedural does not read cutpaste.backgrounds_dir=",
        ),
        (
            {"cutpaste": {"backgrounds": "generated", "backgrounds_dir": "."}},
            "cutpaste.backgrounds: generated does not read cutpaste.backgrounds_dir=",
        ),
        ({"cutpaste": {"num_backgrounds": 0}}, "cutpaste.num_backgrounds: must be > 0"),
        (
            {"cutpaste": {"backgrounds": "generated"}, "dreambooth": {"base_model": ""}},
            "cutpaste.backgrounds=generated samples backgrounds from the pretrained generator, but "
            "dreambooth.base_model is empty: set dreambooth.base_model=",
        ),
        (
            {"generate": {"enabled": True}, "dreambooth": {"base_model": ""}},
            "cutpaste.backgrounds=auto (generated, as generate.enabled=true) samples backgrounds",
        ),
    ],
)
def test_bad_background_settings_fail_naming_the_key_and_fix(layer, expected):
    with pytest.raises(ConfigError) as error:
        build_config(layer)
    assert str(error.value).startswith(expected)


def test_no_base_model_is_fine_when_nothing_is_generated():
    no_base = {"dreambooth": {"base_model": ""}}
    assert _source(no_base) == "procedural"
    disabled = build_config(no_base | {"cutpaste": {"enabled": False, "backgrounds": "generated"},
                                       "train": {"positive_sources": ["real"]}})  # fmt: skip
    assert not disabled.cutpaste.enabled


def test_parse_background_prompts_strips_markers_and_repeats():
    assert parse_background_prompts(REPLY) == ["an empty wooden desk", "a bare tiled floor at night",
                                               "a quiet garden path"]  # fmt: skip


@pytest.fixture
def chat_server():
    server = ChatServer(lambda body: REPLY)
    yield server
    server.close()


def _llm_config(out, n=3):
    return build_config({"output_dir": str(out), "generate": {"enabled": True, "prompt_source": "llm"},
                         "cutpaste": {"num_backgrounds": n}})  # fmt: skip


def test_llm_background_prompts_are_asked_once_and_kept(chat_server, tmp_path, monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    cfg = _llm_config(tmp_path)
    assert unit_config(cfg)["prompts"] == "llm"  # whether the unit is current is known without the endpoint
    with pytest.raises(LLMError, match=ENV_VARS[0]):  # unset variables stop the stage before any work
        check_backgrounds(cfg)
    for name, value in zip(ENV_VARS, (chat_server.base_url, "key", "model"), strict=True):
        monkeypatch.setenv(name, value)
    expected = ["an empty wooden desk", "a bare tiled floor at night", "a quiet garden path"]
    assert background_prompts(cfg) == expected and len(chat_server.requests) == 1
    assert json.loads((tmp_path / "cutpaste" / LLM_PROMPTS).read_text()) == expected
    for name in ENV_VARS:
        monkeypatch.delenv(name)
    check_backgrounds(cfg)  # kept: nothing to ask, no endpoint needed
    assert background_prompts(cfg) == expected and len(chat_server.requests) == 1


def test_template_prompts_are_the_bank_of_empty_scenes(tmp_path):
    cfg = build_config({"output_dir": str(tmp_path), "seed": 4, "cutpaste": {"num_backgrounds": 5}})
    prompts = background_prompts(cfg)
    assert prompts == make_background_prompts(5, seed=4) == unit_config(cfg)["prompts"]
    assert len(set(prompts)) == 5 and all(p.startswith("a photo of an empty scene") for p in prompts)
