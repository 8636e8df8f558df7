"""A small client for an OpenAI-compatible chat-completions endpoint (standard library only).

The paper wrote its generation prompts with an LLM; ``generate.prompt_source=llm`` does the same through any server
that speaks the OpenAI chat-completions protocol (OpenAI, vLLM, Ollama, llama.cpp's server...). Where it is comes
from three environment variables, read by the pipeline (pipelines/generate.py) and handed here as a mapping:

- ``PERSONALIZE_LLM_BASE_URL``: the API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``;
  requests go to ``<base url>/chat/completions``.
- ``PERSONALIZE_LLM_API_KEY``: sent as ``Authorization: Bearer <key>`` (any non-empty value for a server that
  checks none).
- ``PERSONALIZE_LLM_MODEL``: the ``model`` field of each request, e.g. ``gpt-4o-mini``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from personalization.errors import UserError

ENV_BASE_URL = "PERSONALIZE_LLM_BASE_URL"
ENV_API_KEY = "PERSONALIZE_LLM_API_KEY"
ENV_MODEL = "PERSONALIZE_LLM_MODEL"
ENV_VARS = (ENV_BASE_URL, ENV_API_KEY, ENV_MODEL)


class LLMError(UserError):
    """The LLM endpoint is not configured, cannot be reached, or answered something unusable."""


@dataclass(frozen=True)
class LLMEndpoint:
    base_url: str
    model: str
    api_key: str = field(default="", repr=False)  # never printed
    timeout: float = 120.0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


def endpoint_from_env(environ: Mapping[str, str]) -> LLMEndpoint:
    """The endpoint the ``PERSONALIZE_LLM_*`` variables of ``environ`` name; an LLMError naming the unset ones."""
    missing = [name for name in ENV_VARS if not environ.get(name, "").strip()]
    if missing:
        raise LLMError(
            f"generate.prompt_source=llm: the environment variable(s) {', '.join(missing)} are not set. Set "
            f"{ENV_BASE_URL} (an OpenAI-compatible API root, e.g. https://api.openai.com/v1 or "
            f"http://localhost:8000/v1), {ENV_API_KEY} (any non-empty value for a server without keys) and "
            f"{ENV_MODEL} (e.g. gpt-4o-mini); or use generate.prompt_source=template (the built-in prompt bank)"
        )
    return LLMEndpoint(
        base_url=environ[ENV_BASE_URL].strip(), model=environ[ENV_MODEL].strip(), api_key=environ[ENV_API_KEY].strip()
    )


def chat(endpoint: LLMEndpoint, text: str) -> str:
    """Send ``text`` as one user message; the reply's text (``choices[0].message.content``)."""
    body = json.dumps({"model": endpoint.model, "messages": [{"role": "user", "content": text}]}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {endpoint.api_key}"}
    request = urllib.request.Request(endpoint.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout) as reply:
            payload = reply.read()
    except urllib.error.HTTPError as error:
        detail = error.read()[:300].decode(errors="replace")
        raise LLMError(f"{endpoint.url}: HTTP {error.code} {error.reason}: {detail} (check {ENV_VARS})") from error
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise LLMError(f"{endpoint.url}: cannot reach the LLM endpoint ({error}); check {ENV_BASE_URL}") from error
    try:
        return json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise LLMError(
            f"{endpoint.url}: the reply is not a chat completion (choices[0].message.content): {payload[:200]!r}"
        ) from error
