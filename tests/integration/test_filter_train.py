"""`personalize filter` has an effect: train reads its rescored positives and applies filter.threshold to them.

Real stages on the zoo's tiny models: a LoRA DreamBooth generator, generate with the filter off (unscored
positives), train (every generated positive is used), filter (DreamSim rescoring), train again with a threshold
that rejects some: the rows train handed its workers (``rows.parquet``) are exactly those that pass.
"""

import json

import pyarrow.parquet as pq
from tiny_ingest import write_ingest

from personalization.config import build_config, replace
from personalization.schema import read_image_table
from personalization.synthesis.dreambooth import train_dreambooth
from personalization.zoo import build_zoo
from personalization.zoo.diffusion import build_stable_diffusion
from personalization.zoo.dreamsim import build_dreamsim_cache
from pipelines import filter as filter_stage
from pipelines import generate, train, training
from pipelines.common import stage_dir

SIZE = 32


def _used_positives(cfg) -> set[str]:
    """The positive ids in the rows.parquet that train wrote for mug_1's run under ``cfg`` (num_pairs covers every
    anchor x positive pair, so every positive in the pool is used)."""
    cfg = train.resolve_negatives(cfg)
    name = training.run_name(cfg, "mug_1", training.stage_inputs(cfg))
    rows = pq.read_table(stage_dir(cfg, "train", ".ray", "mug_1", f"{name}.inputs", "rows.parquet"))
    return {i for i, role in zip(rows["image_id"].to_pylist(), rows["role"].to_pylist(), strict=True)
            if role == "positive"}  # fmt: skip


def test_train_uses_rescored_positives_and_the_threshold(ray_local, tmp_path):
    out = tmp_path / "out"
    sd = build_stable_diffusion(tmp_path / "zoo")
    photos = write_ingest(out, {"mug_1": "mug", "mug_v": "mug"}, size=SIZE, mask="full")
    instances = json.loads((out / "ingest" / "instances.json").read_text())
    instances["mug_v"]["split"] = "val"  # mug_v's photos are mug_1's negatives
    (out / "ingest" / "instances.json").write_text(json.dumps(instances))
    train_dreambooth(sd, photos["mug_1"], "mug", out / "dreambooth" / "mug_1", mode="lora", steps=1,
                     learning_rate=5e-2, resolution=SIZE, lora_rank=4, seed=0)  # fmt: skip
    cfg = build_config(
        {
            "output_dir": str(out),
            "data": {"instances": ["mug_1"]},
            "dreambooth": {"base_model": str(sd), "mode": "lora", "masked": False},
            "generate": {"enabled": True, "positives_per_instance": 4, "max_attempts": 4, "negatives_per_category": 0,
                         "steps": 2, "image_size": SIZE, "batch_size": 2, "num_actors": 1, "gpus_per_actor": 0.0},
            "filter": {"enabled": False, "cache_dir": str(build_dreamsim_cache(tmp_path / "zoo")),
                       "dreamsim_type": "clip_vitb32", "masker": "none", "batch_size": 2, "threshold": 0.0},
            "model": {"backbone": "dinov2_vitb14", "weights": str(build_zoo(tmp_path / "zoo", ["dinov2"])["dinov2"]),
                      "image_size": 28},
            "train": {"positive_sources": ["dreambooth"], "negatives": "val", "num_triplets": 8, "num_pairs": 8,
                      "batch_size": 4, "epochs": 1, "num_workers": 1},
        }
    )  # fmt: skip
    generate.run(cfg)
    generated = read_image_table(out / "generate" / "positives", columns=["image_id", "score"])
    assert generated.num_rows == 4 and generated["score"].null_count == 4

    # Without `personalize filter`, train uses every generated positive (unscored rows are never filtered out).
    train.run(cfg)
    assert _used_positives(cfg) == set(generated["image_id"].to_pylist())

    filter_stage.run(cfg)
    rescored = read_image_table(out / "filter" / "mug_1", columns=["image_id", "score"])
    scores = dict(zip(rescored["image_id"].to_pylist(), rescored["score"].to_pylist(), strict=True))
    assert set(scores) == set(generated["image_id"].to_pylist()) and None not in scores.values()
    ranked = sorted(scores.values())
    threshold = (ranked[1] + ranked[2]) / 2  # between the 2nd and 3rd score: two pass, two are rejected
    assert ranked[1] < threshold < ranked[2], f"the tiny DreamSim gave tied scores {ranked}"
    strict = replace(cfg, **{"filter.threshold": threshold})
    train.run(strict)
    assert _used_positives(strict) == {i for i, s in scores.items() if s >= threshold}


def test_a_stale_rescoring_is_not_used(tmp_path):
    """OUT/filter/<instance> is read only while its manifest's generate input is the positives generate holds now."""
    from personalization.artifacts import commit_stage
    from personalization.schema import make_row, write_image_table

    out = tmp_path / "out"
    cfg = build_config({"output_dir": str(out)})
    write_ingest(out, {"mug_1": "mug"})
    generated, rescored = out / "generate" / "positives" / "mug_1", out / "filter" / "mug_1"

    def positives(version, score):
        rows = [make_row(image_id=f"g{version}", instance_id="mug_1", category="mug", role="positive",
                         source="dreambooth", image=b"", size=(1, 1), score=score)]  # fmt: skip
        return lambda tmp: write_image_table(rows, tmp / "part.parquet")

    commit_stage(generated, "generate/positives", {"v": 1}, positives(1, None))
    assert training.positives_paths(cfg, "mug_1") == [generated]  # never rescored
    commit_stage(rescored, "filter", {}, positives(1, 0.9), inputs={"generate": generated})
    assert training.positives_paths(cfg, "mug_1") == [rescored]
    commit_stage(generated, "generate/positives", {"v": 2}, positives(2, None))  # generated again
    assert training.positives_paths(cfg, "mug_1") == [generated]
