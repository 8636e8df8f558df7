"""Generation prompts written by an LLM (``generate.prompt_source=llm``), asked once and kept in a prompt file.

The prompts an endpoint returns are saved to a prompt file (``OUT/generate/prompts.json``, the format of
personalization/synthesis/prompts.py) after each instance, so a re-run reuses them and asks again only for
instances it lacks (or that have fewer than ``n``): the endpoint is never called twice for the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from personalization.synthesis.llm import LLMEndpoint, chat, endpoint_from_env
from personalization.synthesis.prompts import TOKEN, PromptError, load_prompts, save_prompts

PROMPTS_FILE = "prompts.json"  # in OUT/generate/
ROUNDS = 3  # requests per instance before too few usable prompts is an error


def _request_text(category: str, n: int) -> str:
    return (
        f"Write {n} different one-line prompts for a text-to-image model, each showing the object '{TOKEN} "
        f"{category}' in a different scene, viewpoint, lighting or context. Every line must contain exactly "
        f"'{TOKEN} {category}'. Reply with the prompts only, one per line."
    )


def parse_prompts(reply: str) -> list[str]:
    """The reply's lines that hold ``<new1>``, list markers and numbering stripped, in order, without repeats."""
    prompts = []
    for line in reply.splitlines():
        line = line.strip().lstrip("-*0123456789.) ").strip()
        if TOKEN in line and line not in prompts:
            prompts.append(line)
    return prompts


def write_prompts_with_llm(category: str, n: int, endpoint: LLMEndpoint, rounds: int = ROUNDS) -> list[str]:
    """``n`` distinct prompts holding ``"<new1> {category}"``, asked of ``endpoint`` up to ``rounds`` times (lines
    without the token are dropped); a PromptError when it still returned fewer."""
    prompts: list[str] = []
    for _ in range(rounds):
        prompts += [p for p in parse_prompts(chat(endpoint, _request_text(category, n))) if p not in prompts]
        if len(prompts) >= n:
            return prompts[:n]
    raise PromptError(
        f"{endpoint.url}: the LLM returned {len(prompts)} usable prompts for {category!r} in {rounds} requests, "
        f"asked {n} (each must hold '{TOKEN} {category}'); lower generate.num_prompts or try another model"
    )


def _saved(path: Path) -> dict[str, list[str]]:
    return load_prompts(path) if path.is_file() else {}


def missing_llm_prompts(instances: Mapping[str, str], path: str | Path, n: int) -> list[str]:
    """The instances (``{instance_id: category}``) that ``path`` holds fewer than ``n`` prompts for."""
    saved = _saved(Path(path))
    return [i for i in instances if len(saved.get(i, ())) < n]


def llm_prompts(
    instances: Mapping[str, str], path: str | Path, n: int, endpoint: Callable[[], LLMEndpoint]
) -> dict[str, list[str]]:
    """``n`` prompts per instance (``{instance_id: category}``): those saved in ``path``, the rest asked of the
    LLM and added to ``path`` one instance at a time. ``endpoint`` is called only when something must be asked
    (so a re-run with every instance saved needs no endpoint)."""
    path = Path(path)
    saved = _saved(path)
    todo = missing_llm_prompts(instances, path, n)
    if todo:
        reach = endpoint()
        for instance_id in todo:
            saved[instance_id] = write_prompts_with_llm(instances[instance_id], n, reach)
            save_prompts(saved, path)
    return {i: saved[i][:n] for i in instances}


def check_llm_endpoint(
    instances: Mapping[str, str], path: str | Path, n: int, environ: Mapping[str, str]
) -> LLMEndpoint | None:
    """Before any work: the endpoint ``environ`` names when some instance still needs LLM prompts (an LLMError
    naming the unset ``PERSONALIZE_LLM_*`` variables), None when ``path`` already holds them all."""
    return endpoint_from_env(environ) if missing_llm_prompts(instances, path, n) else None
