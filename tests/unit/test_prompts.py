import json

import pytest

from personalization.synthesis.prompts import (
    TOKEN,
    PromptError,
    build_prompts,
    load_prompts,
    make_background_prompts,
    make_prompt_bank,
    save_prompts,
)


def test_bank_has_100_distinct_prompts_with_token_and_category():
    for category in ("mug", "shoe"):
        prompts = make_prompt_bank(category, n=150, seed=3)
        assert len(prompts) == len(set(prompts)) == 150
        assert all(f"{TOKEN} {category}" in p for p in prompts)


def test_bank_is_seeded():
    assert make_prompt_bank("mug", n=20, seed=1) == make_prompt_bank("mug", n=20, seed=1)
    assert make_prompt_bank("mug", n=20, seed=1) != make_prompt_bank("mug", n=20, seed=2)


def test_background_prompts_have_no_object():
    prompts = make_background_prompts(50)
    assert len(set(prompts)) == 50
    assert not any(TOKEN in p for p in prompts)


def test_prompt_file_round_trip(tmp_path):
    path = save_prompts({"mug_1": ["a <new1> mug on a desk"]}, tmp_path / "p.json")
    assert load_prompts(path) == {"mug_1": ["a <new1> mug on a desk"]}
    assert build_prompts({"mug_1": "mug"}, str(path)) == {"mug_1": ["a <new1> mug on a desk"]}
    assert len(build_prompts({"mug_1": "mug"}, "", n=7)["mug_1"]) == 7


def test_prompt_without_token_names_file_and_instance(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"mug_1": ["a <new1> mug"], "shoe_2": ["a shoe on grass"]}))
    with pytest.raises(PromptError, match=r"bad\.json.*shoe_2.*<new1>"):
        load_prompts(path)


def test_missing_instance_in_prompt_file(tmp_path):
    path = save_prompts({"mug_1": ["a <new1> mug"]}, tmp_path / "p.json")
    with pytest.raises(PromptError, match="shoe_2"):
        build_prompts({"mug_1": "mug", "shoe_2": "shoe"}, str(path))
