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


def test_llm_prompt_writer_against_a_local_endpoint(monkeypatch):
    """A real HTTP round trip to a local OpenAI-compatible stub: request shape, key from env, parsing."""
    import http.server
    import threading

    from personalization.synthesis.prompts import write_prompts_with_llm

    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen["auth"] = self.headers.get("Authorization")
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            lines = "1. a <new1> mug on a desk\n2. a <new1> mug at night\nno token here\n- a <new1> mug on grass"
            payload = json.dumps({"choices": [{"message": {"content": lines}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_LLM_KEY", "secret")
    url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    try:
        prompts = write_prompts_with_llm("mug", 3, url, model="m", api_key_env="TEST_LLM_KEY")
        assert prompts == ["a <new1> mug on a desk", "a <new1> mug at night", "a <new1> mug on grass"]
        assert seen["auth"] == "Bearer secret" and seen["body"]["model"] == "m"
        with pytest.raises(PromptError, match="returned 3 usable prompts"):
            write_prompts_with_llm("mug", 5, url, model="m", api_key_env="TEST_LLM_KEY")
    finally:
        server.shutdown()
