"""`evaluate` throughput: the Ray Data path of ``pipelines.evaluate`` against a plain in-process loop.

Workload: the toy benchmark after the real ``ingest`` stage, ``instances`` test instances each with a LoRA adapter
(random, non-identity) on the zoo's tiny DINOv2; the pretrained encoder and every personalized encoder embed all
train + test images, make their dense templates and predict on the dense images (what ``evaluate`` computes).
Candidate: ``pipelines.evaluate.run`` end to end (tables, Ray actors, metrics, files). Baseline: the simplest loop:
for each encoder, one ``FeatureExtractor`` in this process, ``embed`` / ``templates`` / ``predict`` batch by batch
(no metrics, no files: the baseline is slightly favoured). Same batch size and torch thread count on both sides.
Throughput = encoder-images processed per second.
"""

from __future__ import annotations

import json
import shutil

import numpy as np

from benchmarks.common import Result, local_ray, ratio, timed, toy_workspace, zoo_dir


def write_adapters(cfg, instances: list[str]) -> None:
    """OUT/train/<instance>/: a committed LoRA adapter with small random weights (as `train` would leave)."""
    import torch

    from personalization.artifacts import commit_stage
    from personalization.models import apply_lora, build_encoder, save_adapter
    from pipelines.common import stage_dir

    for seed, instance in enumerate(instances):

        def build(tmp, seed=seed):
            torch.manual_seed(seed)
            encoder = apply_lora(build_encoder(cfg.model), cfg.model)
            with torch.no_grad():
                for name, parameter in encoder.named_parameters():
                    if "lora_B" in name:
                        parameter.normal_(std=0.05)
            save_adapter(encoder, tmp)
            (tmp / "metrics.json").write_text(json.dumps({"loss": [1.0]}))

        commit_stage(stage_dir(cfg, "train", instance), "train", {"seed": seed}, build)


def _batches(table, size: int):
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size).to_pydict()


def load_tables(images_path, instances: dict[str, dict]) -> dict:
    """The real image rows split by use, all in memory (the simplest reading): gallery, test, dense."""
    import pyarrow.compute as pc

    from personalization import schema

    population = sorted(i for i, info in instances.items() if info["split"] != "val")
    table = schema.read_image_table(images_path, role=["real_train", "real_test"], instance_id=population)
    train = table.filter(pc.equal(table["role"], "real_train"))
    test_all = table.filter(pc.equal(table["role"], "real_test"))
    is_dense = pc.equal(test_all["split"], "test_dense")
    test = test_all.filter(pc.invert(is_dense))
    dense = test_all.filter(is_dense)
    if dense.num_rows == 0:
        dense = test_all.filter(pc.is_valid(test_all["mask"]))
    return {"train": train, "test": test if test.num_rows else test_all, "dense": dense}


def plain_loop(cfg, instances: list[str]) -> int:
    """Every encoder's features in one process: the simplest direct loop. Returns encoder-images processed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from personalization.config import to_dict
    from personalization.evaluation.extract import FeatureExtractor
    from pipelines.common import load_instances, stage_dir

    info = load_instances(cfg)
    tables = load_tables(stage_dir(cfg, "ingest", "images.parquet"), info)
    masked = tables["train"].filter(pc.is_valid(tables["train"]["mask"]))
    size, done = cfg.evaluate.batch_size, 0
    encoders = [("", instances)] + [(str(stage_dir(cfg, "train", i)), [i]) for i in instances]
    for adapter, owned in encoders:
        extractor = FeatureExtractor(to_dict(cfg.model), adapter, dense_size=cfg.evaluate.dense_image_size)
        for batch in _batches(pa.concat_tables([tables["train"], tables["test"]]), size):
            extractor.embed(batch["image"])
            done += len(batch["image"])
        templates = {}
        for instance in owned:
            rows = masked.filter(pc.equal(masked["instance_id"], instance)).to_pydict()
            references, box_means = extractor.templates(rows["image"], rows["mask"])
            templates[instance] = (references[0], box_means)
            done += len(rows["image"])
        for batch in _batches(tables["dense"], size):
            hw = list(zip(batch["height"], batch["width"], strict=True))
            extractor.predict(batch["image"], batch["image_id"], hw, templates, cfg.evaluate.min_object_pixels)
            done += len(batch["image"])
    return done


def measure(instances: int = 3, size: int = 64, batch: int = 16) -> Result:
    import torch

    from personalization.config import build_config
    from personalization.zoo import build_zoo
    from pipelines import evaluate
    from pipelines.common import load_instances, stage_dir

    dinov2 = build_zoo(zoo_dir(), parts=["dinov2"])["dinov2"]
    result = Result("evaluate", "ray stage / plain loop, encoder-images/s", 0.0)
    threads = torch.get_num_threads()
    with local_ray():
        import ray

        run_dir, layer = toy_workspace("evaluate", instances=instances, composites=0, size=size)
        layer = layer | {
            "model": {"backbone": "dinov2_vitb14", "weights": str(dinov2), "image_size": 28},
            "evaluate": {"batch_size": batch, "num_actors": 1, "dense_image_size": 56, "min_object_pixels": 20},
        }
        cfg = build_config(layer)
        chosen = sorted(i for i, v in load_instances(cfg).items()
                        if v["split"] == "test")  # fmt: skip
        write_adapters(cfg, chosen)

        @ray.remote(num_cpus=1)
        def actor_threads() -> int:
            return torch.get_num_threads()

        used = ray.get(actor_threads.remote())
        torch.set_num_threads(used)
        try:
            done, plain_s = timed(lambda: plain_loop(cfg, chosen))
            shutil.rmtree(stage_dir(cfg, "evaluate"), ignore_errors=True)
            _, ray_s = timed(lambda: evaluate.run(cfg))
        finally:
            torch.set_num_threads(threads)
    metrics = json.loads(stage_dir(cfg, "evaluate", "metrics.json").read_text())
    assert np.isfinite(metrics["pretrained"]["retrieval/ndcg"])
    result.add("plain loop", done / plain_s, "encoder-images/s")
    result.add("ray stage (evaluate.run)", done / ray_s, "encoder-images/s")
    result.add("plain loop wall", plain_s, "s")
    result.add("ray stage wall", ray_s, "s")
    result.add("ray overhead (ray wall - plain wall)", ray_s - plain_s, "s")
    result.add("encoders (pretrained + personalized)", len(chosen) + 1, "")
    result.notes.append(
        f"tiny DINOv2 (zoo), 28 px embed / 56 px dense, batch {batch}, {len(chosen)} test instances + 1 val, "
        f"{done} encoder-images; torch threads {used} per side"
    )
    result.ratio = ratio(done / ray_s, done / plain_s)
    return result
