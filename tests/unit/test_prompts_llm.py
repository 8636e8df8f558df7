"""generate.prompt_source: the LLM prompt writer against a real local HTTP server speaking the chat-completions
protocol (no client code replaced), the prompt file it keeps, and the errors before any work."""

import json

import pytest
import skimage.data
from chat_server import ChatServer
from PIL import Image

from personalization.config import ConfigError, build_config
from personalization.synthesis.llm import ENV_VARS, LLMEndpoint, LLMError
from personalization.synthesis.prompts import PromptError, load_prompts, make_prompt_bank
from personalization.synthesis.prompts_llm import write_prompts_with_llm
from pipelines.common import check_before_start
from pipelines.generate import choose_prompts, prompts_path

# numbered and bulleted lines, a line without the token, a repeat
REPLY = "\n".join(["1. a <new1> {c} on a desk", "2. a <new1> {c} at night", "no token here", "- a <new1> {c} on grass",
                   "* a <new1> {c} at night"])  # fmt: skip


@pytest.fixture
def chat_server():
    def reply(body: dict) -> str:  # the category the request names
        return REPLY.format(c="shoe" if "<new1> shoe" in body["messages"][0]["content"] else "mug")

    server = ChatServer(reply)
    yield server
    server.close()


def _env(monkeypatch, base_url):
    for name, value in zip(ENV_VARS, (base_url, "secret", "prompt-model"), strict=True):
        monkeypatch.setenv(name, value)


def _config(out, **generate):
    return build_config({"output_dir": str(out), "generate": {"num_prompts": 3} | generate})


def test_llm_prompts_are_asked_once_and_kept_in_the_output(chat_server, tmp_path, monkeypatch):
    _env(monkeypatch, chat_server.base_url)
    cfg = _config(tmp_path / "out", prompt_source="llm")
    categories = {"mug_01": "mug", "shoe_02": "shoe"}
    prompts = choose_prompts(cfg, categories)
    assert prompts["mug_01"] == ["a <new1> mug on a desk", "a <new1> mug at night", "a <new1> mug on grass"]
    assert prompts["shoe_02"][0] == "a <new1> shoe on a desk"
    assert len(chat_server.requests) == 2
    request = chat_server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["model"] == "prompt-model" and "'<new1> mug'" in request["body"]["messages"][0]["content"]
    assert prompts_path(cfg) == tmp_path / "out" / "generate" / "prompts.json"
    assert load_prompts(prompts_path(cfg)) == prompts
    # a re-run reuses the file: no request, and no endpoint needed at all
    for name in ENV_VARS:
        monkeypatch.delenv(name)
    chat_server.close()
    assert choose_prompts(cfg, categories) == prompts
    assert len(chat_server.requests) == 2


def test_too_few_usable_prompts_after_every_round(chat_server):
    endpoint = LLMEndpoint(base_url=chat_server.base_url, model="m", api_key="k")
    with pytest.raises(PromptError, match=r"returned 3 usable prompts for 'mug' in 3 requests, asked 5"):
        write_prompts_with_llm("mug", 5, endpoint)
    assert len(chat_server.requests) == 3


def test_an_http_error_names_the_url(chat_server):
    endpoint = LLMEndpoint(base_url=chat_server.base_url + "/wrong", model="m", api_key="k")
    with pytest.raises(LLMError, match=r"/v1/wrong/chat/completions: HTTP 404"):
        write_prompts_with_llm("mug", 2, endpoint)


def test_unset_variables_fail_before_any_work(tmp_path, monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    photos = tmp_path / "my_mug"
    photos.mkdir()
    Image.fromarray(skimage.data.coffee()[:64, :64]).save(photos / "a.png")
    overrides = {"data": {"root": str(photos), "category": "mug"}, "dreambooth": {"enabled": True},
                 "generate": {"enabled": True, "prompt_source": "llm"}}  # fmt: skip
    cfg = build_config({"output_dir": str(tmp_path / "out")}, overrides)
    with pytest.raises(LLMError, match="PERSONALIZE_LLM_BASE_URL, PERSONALIZE_LLM_API_KEY, PERSONALIZE_LLM_MODEL"):
        check_before_start(cfg)
    assert not (tmp_path / "out").exists()


def test_template_is_the_default_and_sources_do_not_mix(tmp_path):
    cfg = _config(tmp_path / "out")
    assert cfg.generate.prompt_source == "auto"
    assert choose_prompts(cfg, {"mug_01": "mug"}) == {"mug_01": make_prompt_bank("mug", n=3)}
    with pytest.raises(ConfigError, match=r"generate\.prompts_file: generate\.prompt_source=file needs"):
        _config(tmp_path, prompt_source="file")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"mug_01": ["a <new1> mug"]}))
    with pytest.raises(ConfigError, match=r"generate\.prompt_source: llm does not read generate\.prompts_file"):
        _config(tmp_path, prompt_source="llm", prompts_file=str(prompts))
    assert choose_prompts(_config(tmp_path, prompt_source="file", prompts_file=str(prompts)), {"mug_01": "mug"}) == {
        "mug_01": ["a <new1> mug"]
    }
