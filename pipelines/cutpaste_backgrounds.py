"""Generated Cut-and-Paste backgrounds (``cutpaste.backgrounds=generated``, or auto with generation on): the paper's.

``cutpaste.num_backgrounds`` images of empty scenes, sampled from the pretrained generator (``dreambooth.base_model``)
with background prompts (the built-in bank's, personalization/synthesis/prompts.py: make_background_prompts; an
LLM's when ``generate.prompt_source=llm``) through the generate stage's machinery: ImageSampler actors (GPU when
the cluster has one), with ``generate.steps``, ``image_size``, ``scheduler``, ``guidance_scale``, ``batch_size``,
``num_actors`` and ``gpus_per_actor``.

They are committed once as one unit, ``OUT/cutpaste/_backgrounds/``: an image table (role background, source
pretrained, each row's prompt and seed recorded) and a manifest whose hash covers the sampling settings, the count,
the seed and the prompts (for an LLM, that it wrote them). Every object and every later run reuses the unit, and
a crash before its manifest leaves nothing that counts. The leading ``_`` keeps its rows out of every reader of
``OUT/cutpaste`` (schema.parquet_files skips such folders). LLM prompts are kept in
``OUT/cutpaste/_background_prompts.json`` as soon as they arrive, so a crashed generation does not ask again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from personalization import schema
from personalization.artifacts import commit_stage, is_current, read_manifest, write_json_atomic
from personalization.config import ExperimentConfig
from personalization.synthesis.backgrounds import write_background_prompts_with_llm
from personalization.synthesis.generation_rows import check_generator, make_generation_rows
from personalization.synthesis.generators import find_generator
from personalization.synthesis.llm import endpoint_from_env
from personalization.synthesis.prompts import make_background_prompts
from pipelines.common import ray_session, resolved, stage_dir
from pipelines.generation import run_generation

UNIT = "cutpaste/backgrounds"  # the stage name in the unit's manifest
FOLDER = "_backgrounds"  # under OUT/cutpaste
LLM_PROMPTS = "_background_prompts.json"  # under OUT/cutpaste
INSTANCE = "backgrounds"  # the rows' instance_id: they belong to no object
log = logging.getLogger("personalize.cutpaste")


def backgrounds_path(cfg: ExperimentConfig) -> Path:
    return stage_dir(cfg, "cutpaste", FOLDER)


def _uses_llm(cfg: ExperimentConfig) -> bool:
    return cfg.generate.prompt_source == "llm"


def unit_config(cfg: ExperimentConfig) -> dict:
    """What the generated backgrounds depend on (their unit's hash). LLM prompts enter as "llm", so checking
    whether the unit is current never asks the endpoint."""
    gen = cfg.generate
    n = cfg.cutpaste.num_backgrounds
    return {
        "base_model": cfg.dreambooth.base_model,
        "generator_type": cfg.dreambooth.generator_type,
        "sampling": {
            "steps": gen.steps,
            "image_size": gen.image_size,
            "scheduler": gen.scheduler,
            "cfg": gen.guidance_scale,
        },
        "seed": cfg.seed,
        "n": n,
        "prompts": "llm" if _uses_llm(cfg) else make_background_prompts(n, cfg.seed),
    }


def backgrounds_current(cfg: ExperimentConfig) -> bool:
    return is_current(backgrounds_path(cfg), UNIT, unit_config(cfg))


def _saved_llm_prompts(cfg: ExperimentConfig) -> list[str]:
    path = stage_dir(cfg, "cutpaste", LLM_PROMPTS)
    return json.loads(path.read_text()) if path.is_file() else []


def check_backgrounds(cfg: ExperimentConfig) -> None:
    """Before any Ray work, when the backgrounds are still to make: the base generator is a usable diffusers model
    of a registered family, and an LLM that must be asked is configured (PERSONALIZE_LLM_*)."""
    check_generator(cfg.dreambooth.base_model)
    find_generator(cfg.dreambooth.base_model, cfg.dreambooth.generator_type)
    if _uses_llm(cfg) and len(_saved_llm_prompts(cfg)) < cfg.cutpaste.num_backgrounds:
        endpoint_from_env(os.environ)


def background_prompts(cfg: ExperimentConfig) -> list[str]:
    """``num_backgrounds`` prompts of empty scenes: the bank's, or the LLM's (asked once, then kept)."""
    n = cfg.cutpaste.num_backgrounds
    if not _uses_llm(cfg):
        return make_background_prompts(n, cfg.seed)
    saved = _saved_llm_prompts(cfg)
    if len(saved) < n:
        saved = write_background_prompts_with_llm(n, endpoint_from_env(os.environ))
        write_json_atomic(stage_dir(cfg, "cutpaste", LLM_PROMPTS), saved)
    return saved[:n]


def ensure_backgrounds(cfg: ExperimentConfig) -> Path:
    """The committed unit of generated backgrounds: reused when current, else sampled now and committed (the caller
    has run :func:`check_backgrounds` before starting Ray: pipelines/cutpaste.py:run)."""
    out, config = backgrounds_path(cfg), unit_config(cfg)
    if is_current(out, UNIT, config):
        log.info("cutpaste: reusing the %d generated backgrounds in %s", read_manifest(out)["rows"], out)
        return out
    base, gen, n = cfg.dreambooth.base_model, cfg.generate, cfg.cutpaste.num_backgrounds
    prompts = background_prompts(cfg)
    rows = make_generation_rows(INSTANCE, "", prompts, n, generator=base, cfg=gen.guidance_scale, seed=cfg.seed,
                                role="background", source="pretrained")  # fmt: skip
    log.info(
        "cutpaste: generating %d backgrounds from %s (%d %s prompts; %d steps, %d px, %d actor(s))",
        n, base, len(prompts), "LLM" if _uses_llm(cfg) else "built-in", gen.steps, gen.image_size, gen.num_actors,
    )  # fmt: skip
    started = time.monotonic()

    def build(tmp: Path) -> int:
        with ray_session(cfg):
            made = run_generation(cfg, rows, tmp, base_model=base)
        if made != n:
            raise RuntimeError(f"cutpaste backgrounds: the generation wrote {made} images, expected {n}")
        return made

    commit_stage(out, UNIT, config, build, resolved_config=resolved(cfg))
    log.info("cutpaste: committed %d generated backgrounds to %s in %.1f s", n, out, time.monotonic() - started)
    return out


def load_generated_backgrounds(folder: Path) -> tuple[list[bytes], str]:
    """PNG bytes of the committed backgrounds (in seed order), and the key naming the set (from its manifest hash)."""
    table = schema.read_image_table(folder, columns=["seed", "image"]).sort_by("seed")
    return table["image"].to_pylist(), f"generated:{read_manifest(folder)['hash'][:16]}"
