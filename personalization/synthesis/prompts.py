"""Prompts for personalized generation: prompt files, the built-in bank, and background prompts.

A prompt file is JSON ``{instance_id: [prompt, ...]}``; every prompt names the object as ``<new1> {category}``
(``<new1>`` is plain text that DreamBooth bound to the instance, no new token). The built-in bank composes
scenes x viewpoints x lighting x contexts, so it gives hundreds of distinct prompts per category, chosen by a
seeded shuffle (same seed -> same prompts). Background prompts describe the same scenes with the object removed,
for Cut-and-Paste.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from personalization.artifacts import write_text_atomic
from personalization.errors import UserError

TOKEN = "<new1>"

SCENES = (
    "on a wooden desk",
    "on a kitchen counter",
    "on a marble table",
    "on a park bench",
    "in a living room",
    "on a bookshelf",
    "on a sandy beach",
    "in a garden",
    "on a window sill",
    "on a picnic blanket",
    "in an office",
    "on a concrete floor",
    "in a cafe",
    "on a bed",
    "in a forest clearing",
    "on a rock by a lake",
)
VIEWPOINTS = ("", "seen from above", "seen from the side", "in a close-up shot", "from a low angle", "from far away")
LIGHTING = ("", "in soft morning light", "at sunset", "under studio lighting", "on a cloudy day", "at night")
CONTEXTS = (
    "",
    "next to a potted plant",
    "beside a stack of books",
    "with people in the background",
    "surrounded by other objects",
)
STARTS = ("a photo of", "a picture of", "an image of")


class PromptError(UserError):
    """A prompt file or prompt that cannot be used; the message names the file and the instance."""


def _compose(subject: str, scene: str, view: str, light: str, context: str, start: str) -> str:
    words = [start, subject, scene, context, view, light]
    return " ".join(w for w in words if w)


def make_prompt_bank(category: str, n: int = 100, seed: int = 0, token: str = TOKEN) -> list[str]:
    """``n`` distinct prompts holding ``"{token} {category}"``; a seeded sample of the full composition grid.

    The grid has 16 scenes x 6 viewpoints x 6 lights x 5 contexts x 3 openings = 8640 prompts per category.
    """
    if not category:
        raise PromptError("make_prompt_bank: category is empty; give the object's category, e.g. 'mug'")
    subject = f"{token} {category}" if token else category
    grid = list(itertools.product(SCENES, VIEWPOINTS, LIGHTING, CONTEXTS, STARTS))
    if n > len(grid):
        raise PromptError(f"make_prompt_bank: asked for {n} prompts, the bank composes at most {len(grid)}")
    rng = random.Random(f"{seed}:{category}")
    return [_compose(subject, *combo) for combo in rng.sample(grid, n)]


def make_background_prompts(n: int = 100, seed: int = 0) -> list[str]:
    """Scene prompts with no object in them (``"an empty wooden desk ..."``), backgrounds for Cut-and-Paste."""
    grid = list(itertools.product(SCENES, VIEWPOINTS, LIGHTING))
    rng = random.Random(f"{seed}:background")
    picks = rng.sample(grid, min(n, len(grid)))
    return [" ".join(w for w in ("a photo of an empty scene", scene, view, light) if w) for scene, view, light in picks]


def validate_prompts(prompts: Mapping[str, Sequence[str]], where: str = "prompts", token: str = TOKEN) -> None:
    """Every instance has a non-empty list of strings, each holding ``token``; else a PromptError naming it."""
    if not isinstance(prompts, Mapping):
        raise PromptError(
            f"{where}: must be a JSON object {{instance_id: [prompt, ...]}}, got {type(prompts).__name__}"
        )
    for instance_id, items in prompts.items():
        if isinstance(items, str) or not isinstance(items, Sequence) or not items:
            raise PromptError(f"{where}: instance {instance_id!r} needs a non-empty list of prompts")
        for prompt in items:
            if not isinstance(prompt, str) or token not in prompt:
                raise PromptError(
                    f"{where}: instance {instance_id!r} has prompt {prompt!r} without {token}; "
                    f"write the object as '{token} <category>', e.g. 'a {token} mug on a desk'"
                )


def load_prompts(path: str | Path) -> dict[str, list[str]]:
    """Read and validate a ``{instance_id: [prompt, ...]}`` JSON file."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: prompt file does not exist")
    try:
        prompts = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PromptError(f"{path}: not valid JSON ({error})") from error
    validate_prompts(prompts, where=str(path))
    return {str(k): list(v) for k, v in prompts.items()}


def save_prompts(prompts: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    validate_prompts(prompts, where=str(path))
    return write_text_atomic(path, json.dumps({k: list(v) for k, v in prompts.items()}, indent=1))


def build_prompts(
    instances: Mapping[str, str], prompts_file: str = "", n: int = 100, seed: int = 0
) -> dict[str, list[str]]:
    """Prompts per instance (``instances`` = {instance_id: category}): from ``prompts_file`` when given (every
    instance must be in it), else the built-in bank. At most ``n`` prompts per instance. (LLM-written prompts:
    personalization/synthesis/prompts_llm.py.)"""
    if prompts_file:
        loaded = load_prompts(prompts_file)
        missing = sorted(set(instances) - set(loaded))
        if missing:
            raise PromptError(f"{prompts_file}: no prompts for instances {missing}; add them or clear the file")
        return {iid: loaded[iid][:n] for iid in instances}
    return {iid: make_prompt_bank(category, n=n, seed=seed) for iid, category in instances.items()}
