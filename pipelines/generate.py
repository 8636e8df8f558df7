"""`personalize generate`: positives from each instance's personalized generator, negatives from the pretrained one.

Reads OUT/ingest (instances.json, images.parquet for the filter) and OUT/dreambooth/<instance>/ (diffusers or LoRA
folders). Commits:
- OUT/generate/positives/<instance>/: image-table shards, role=positive, source=dreambooth|masked_dreambooth,
  scored by the DreamSim filter when ``filter.enabled``. Every scored row is kept: ``filter.threshold`` is applied
  when train reads them (personalization/contrastive/data.py: read_positives, the one rule); here it only decides
  when an instance has enough accepted images to stop;
- OUT/generate/negatives/<category>/: role=negative, source=pretrained, instance_id ``<category>_negatives``,
  made once per category and shared by all its instances (each with its own manifest).
Ray Data: rows -> ImageSampler actor pool -> (Scorer actor pool) -> Parquet. With the filter on, each instance gets
up to ``generate.max_attempts`` rows and the stream stops once every instance has ``positives_per_instance``
accepted images; without it, exactly ``positives_per_instance`` rows.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from personalization import schema
from personalization.artifacts import commit_stage, is_current, read_manifest
from personalization.config import ExperimentConfig
from personalization.errors import MissingInputError
from personalization.synthesis.generation_rows import check_generator, make_generation_rows
from personalization.synthesis.generators import find_generator
from personalization.synthesis.llm import endpoint_from_env
from personalization.synthesis.prompts import build_prompts, load_prompts
from personalization.synthesis.prompts_llm import PROMPTS_FILE, llm_prompts
from pipelines import common
from pipelines.common import ray_session, resolved, scorer_kwargs, stage_dir, stage_main
from pipelines.generation import run_generation
from pipelines.instances import without_failed
from pipelines.resources import without_placement

STAGE = "generate"
log = logging.getLogger(f"personalize.{STAGE}")


def negative_prompt(category: str) -> str:
    return f"a photo of {category}"


def _read_instances(cfg: ExperimentConfig) -> tuple[dict[str, dict], list[str]]:
    instances = common.load_instances(cfg)
    return instances, without_failed(cfg, STAGE, common.select_instances(cfg, instances))


def positive_source(cfg: ExperimentConfig) -> str:
    return "masked_dreambooth" if cfg.dreambooth.masked else "dreambooth"


def check_inputs(cfg: ExperimentConfig, instance_ids: Sequence[str]) -> dict[str, str]:
    """Everything that can be wrong, checked before any actor starts; returns {instance_id: generator folder}."""
    check_generator(cfg.dreambooth.base_model)
    find_generator(cfg.dreambooth.base_model, cfg.dreambooth.generator_type)  # an unknown model family fails here
    if cfg.generate.prompts_file:
        load_prompts(cfg.generate.prompts_file)  # a broken prompt file fails here, before Ray starts
    generators = {}
    for instance_id in instance_ids:
        folder = stage_dir(cfg, "dreambooth", instance_id)
        if not folder.exists():
            raise MissingInputError(
                f"{folder}: no personalized generator for {instance_id}; run `personalize dreambooth`"
            )
        generators[instance_id] = check_generator(str(folder))
    if cfg.filter.enabled and cfg.generate.positives_per_instance:
        from personalization.filtering.embedders import check_dreamsim_cache
        from personalization.filtering.scorer import check_real_table

        check_dreamsim_cache(cfg.filter.cache_dir, cfg.filter.dreamsim_type)
        check_real_table(stage_dir(cfg, "ingest", "images.parquet"), instance_ids)
    return generators


def prompts_path(cfg: ExperimentConfig) -> Path:
    """Where ``generate.prompt_source=llm`` keeps the prompts it was given (reused by every later run)."""
    return stage_dir(cfg, STAGE, PROMPTS_FILE)


def choose_prompts(cfg: ExperimentConfig, categories: dict[str, str]) -> dict[str, list[str]]:
    """``generate.num_prompts`` prompts per instance (``categories`` = {instance_id: category}), from the source
    ``generate.prompt_source`` names: the built-in bank, ``generate.prompts_file`` or the LLM endpoint."""
    gen = cfg.generate
    if gen.prompt_source == "llm":
        return llm_prompts(categories, prompts_path(cfg), gen.num_prompts, lambda: endpoint_from_env(os.environ))
    prompts_file = gen.prompts_file if gen.prompt_source in ("auto", "file") else ""
    return build_prompts(categories, prompts_file, n=gen.num_prompts, seed=cfg.seed)


def _sampling_config(cfg: ExperimentConfig) -> dict:
    keys = ("steps", "image_size", "scheduler")  # "cfg": the guidance scale under its image-table name
    sampling = {"cfg": cfg.generate.guidance_scale} | {k: getattr(cfg.generate, k) for k in keys}
    return sampling | {"base_model": cfg.dreambooth.base_model, "seed": cfg.seed}


def run_negatives(cfg: ExperimentConfig, categories: Sequence[str]) -> list[Path]:
    """OUT/generate/negatives/<category>/: ``negatives_per_category`` pretrained images per category.

    Each category commits on its own (so instances of a category share one set, made once), but the categories
    still to make are generated in one Ray Data stream so the actor pool loads the pipeline once.
    """
    n = cfg.generate.negatives_per_category
    base = cfg.dreambooth.base_model
    configs = {c: {"sampling": _sampling_config(cfg), "category": c, "n": n} for c in categories}
    outs = {c: stage_dir(cfg, STAGE, "negatives", c) for c in categories}
    todo = [c for c in categories if not is_current(outs[c], f"{STAGE}/negatives", configs[c])]
    if not todo:
        return list(outs.values())
    # A killed run leaves its scratch behind; this run holds output_dir's lock, so any scratch here is dead.
    for leftover in stage_dir(cfg, STAGE).glob(".negatives-scratch-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    scratch = stage_dir(cfg, STAGE, f".negatives-scratch-{os.getpid()}")
    try:
        rows = [
            row
            for c in todo
            for row in make_generation_rows(
                f"{c}_negatives",
                c,
                [negative_prompt(c)],
                n,
                generator=base,
                cfg=cfg.generate.guidance_scale,
                seed=cfg.seed,
                role="negative",
                source="pretrained",
            )
        ]
        log.info("generate: %d negatives for %s from %s", len(rows), todo, base)
        with ray_session(cfg):
            run_generation(cfg, rows, scratch, base_model=base)
        for c in todo:
            table = schema.read_image_table(scratch, category=c)
            commit_stage(
                outs[c],
                f"{STAGE}/negatives",
                configs[c],
                lambda tmp, table=table: schema.write_image_table(table, tmp / "negatives.parquet"),
                resolved_config=resolved(cfg),
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return list(outs.values())


def run_positives(
    cfg: ExperimentConfig, instances: dict[str, dict], instance_ids: list[str], generators: dict[str, str]
) -> Path:
    """OUT/generate/positives/<instance>/: each instance commits on its own as soon as it has its positives.

    One stream serves many instances (LoRA generators share a pipeline), so the stream's batches are spread to
    per-instance scratch folders on disk as they arrive (the driver holds one batch), and an instance commits
    once it has ``positives_per_instance`` accepted rows (or, unfiltered, rows). A crash keeps every committed
    instance; adding or retrying one instance generates only for it.
    """
    gen = cfg.generate
    categories = {i: instances[i]["category"] for i in instance_ids}
    prompts = choose_prompts(cfg, categories)
    filtered = cfg.filter.enabled
    per_instance = gen.max_attempts if filtered else gen.positives_per_instance
    out = stage_dir(cfg, STAGE, "positives")
    _drop_single_unit_layout(out)
    configs = {
        i: {
            "sampling": _sampling_config(cfg),
            # prompt_source is left out: the prompts it chose are hashed, so older outputs stay current
            "generate": {k: v for k, v in without_placement(gen).items() if k != "prompt_source"},
            "prompts": prompts[i],
            "filter": without_placement(cfg.filter) if filtered else None,
            "source": positive_source(cfg),
            "instance": i,
        }
        for i in instance_ids
    }
    inputs = {i: {"dreambooth": Path(generators[i])} | ({"ingest": stage_dir(cfg, "ingest")} if filtered else {})
              for i in instance_ids}  # fmt: skip
    todo = [i for i in instance_ids if not is_current(out / i, f"{STAGE}/positives", configs[i], inputs[i])]
    log.info("generate: positives for %d of %d instance(s)", len(todo), len(instance_ids))
    if not todo:
        return out
    for leftover in out.glob(".*.partial"):  # a killed run's scratch (this run holds output_dir's lock)
        shutil.rmtree(leftover)
    units = PositiveUnits(out, todo, cfg, configs, inputs, needed=gen.positives_per_instance, filtered=filtered)
    if gen.positives_per_instance == 0:
        units.commit_all()
        return out

    def rows_for(instance_id: str) -> list[dict]:
        return make_generation_rows(
            instance_id,
            categories[instance_id],
            prompts[instance_id],
            per_instance,
            generator=generators[instance_id],
            cfg=gen.guidance_scale,
            seed=cfg.seed,
            role="positive",
            source=positive_source(cfg),
            instance_split=instances[instance_id]["split"],
        )

    # LoRA generators share one pipeline (adapters swap), so their rows interleave in one stream; a full
    # generator is a whole pipeline, so each of those instances streams on its own.
    lora = [i for i in todo if Path(generators[i], "pytorch_lora_weights.safetensors").is_file()]
    groups = ([lora] if lora else []) + [[i] for i in todo if i not in lora]
    with ray_session(cfg):
        for group in groups:
            per = [rows_for(i) for i in group]
            rows = [r for k in range(per_instance) for rs in per for r in rs[k : k + 1]]
            needed = {i: gen.positives_per_instance for i in group} if filtered else None
            log.info("generate: %d rows for %s (filter %s)", len(rows), group, "on" if filtered else "off")
            run_generation(
                cfg,
                rows,
                out,
                base_model=cfg.dreambooth.base_model,
                scorer_kwargs=scorer_kwargs(cfg) if filtered else None,
                needed=needed,
                sink=units.add,
            )
            units.commit_all(group)  # what the stream ended with (max_attempts reached): committed as it is
    return out


class PositiveUnits:
    """Per-instance scratch folders that fill from a stream and commit once an instance has what it needs."""

    def __init__(self, out: Path, instance_ids, cfg: ExperimentConfig, configs, inputs, *, needed: int, filtered):
        self.out, self.cfg, self.configs, self.inputs = out, cfg, configs, inputs
        self.needed, self.filtered = needed, filtered
        self.counts = dict.fromkeys(instance_ids, 0)  # accepted rows (all rows when unfiltered)
        self.shards = dict.fromkeys(instance_ids, 0)

    def scratch(self, instance_id: str) -> Path:
        return self.out / f".{instance_id}.partial"

    def add(self, table: pa.Table) -> None:
        for instance_id in sorted(set(table["instance_id"].to_pylist()) & set(self.counts)):
            part = table.filter(pc.equal(table["instance_id"], instance_id))
            folder = self.scratch(instance_id)
            folder.mkdir(parents=True, exist_ok=True)
            schema.write_image_table(part, folder / f"part-{self.shards[instance_id]:05d}.parquet")
            self.shards[instance_id] += 1
            scores = part["score"].to_pylist()
            threshold = self.cfg.filter.threshold
            self.counts[instance_id] += (
                sum(s is not None and s >= threshold for s in scores) if self.filtered else len(scores)
            )
            if self.counts[instance_id] >= self.needed:
                self.commit(instance_id)

    def commit(self, instance_id: str) -> None:
        scratch = self.scratch(instance_id)

        def build(tmp: Path) -> int:
            if not scratch.is_dir():
                return schema.write_image_table([], tmp / "empty.parquet")
            for shard in sorted(scratch.glob("*.parquet")):
                shard.rename(tmp / shard.name)
            return schema.read_image_table(tmp, columns=["image_id"]).num_rows

        commit_stage(
            self.out / instance_id,
            f"{STAGE}/positives",
            self.configs[instance_id],
            build,
            inputs=self.inputs[instance_id],
            resolved_config=resolved(self.cfg),
        )
        shutil.rmtree(scratch, ignore_errors=True)
        del self.counts[instance_id]
        log.info("generate: committed positives of %s", instance_id)

    def commit_all(self, instance_ids=None) -> None:
        for instance_id in [i for i in (instance_ids or list(self.counts)) if i in self.counts]:
            if self.filtered and self.counts[instance_id] < self.needed:
                log.warning(
                    "generate: %s ends with %d of %d accepted positives (generate.max_attempts reached)",
                    instance_id, self.counts[instance_id], self.needed,
                )  # fmt: skip
            self.commit(instance_id)


def _drop_single_unit_layout(out: Path) -> None:
    """Older runs committed all positives as one unit (a manifest at the top): rebuild them per instance."""
    if read_manifest(out) is not None:
        log.info("generate: %s holds the one-unit layout of an older run; rebuilding it per instance", out)
        shutil.rmtree(out)


def run(cfg: ExperimentConfig) -> Path:
    instances, instance_ids = _read_instances(cfg)
    generators = check_inputs(cfg, instance_ids)
    common.check_prompt_source(cfg, instance_ids, instances)
    with ray_session(cfg):  # one Ray for both parts (reused when already running)
        if cfg.generate.negatives_per_category:
            run_negatives(cfg, sorted({instances[i]["category"] for i in instance_ids}))
        run_positives(cfg, instances, instance_ids, generators)
    return stage_dir(cfg, STAGE)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)
