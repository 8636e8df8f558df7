"""Ray Data actors killed mid-stage: the stage still commits exactly the requested rows, once each.

The actors die for real (``os._exit`` inside the actor process, see ``faults.dying_class``); Ray restarts them
(Ray Data actor pools default to ``max_restarts=-1``, ``max_task_retries=-1``) and retries the lost batch.
"""

import json
import shutil
from collections import Counter

import faults
import pytest

from personalization.artifacts import read_manifest
from personalization.config import build_config
from personalization.schema import read_image_table

SIZE = 32
PER_INSTANCE = 6


@pytest.fixture
def generate_workspace(tmp_path, zoo):
    """OUT/ingest/instances.json for two instances whose generators are full diffusers folders (the tiny SD)."""
    out = tmp_path / "out"
    instances = {"mug_1": {"category": "mug", "split": "test"}, "mug_2": {"category": "mug", "split": "test"}}
    (out / "ingest").mkdir(parents=True)
    (out / "ingest" / "instances.json").write_text(json.dumps(instances))
    for instance_id in instances:
        shutil.copytree(zoo["stable_diffusion"], out / "dreambooth" / instance_id)
    return out


def _generate_cfg(out, sd, **overrides):
    generate = {
        "enabled": True,
        "positives_per_instance": PER_INSTANCE,
        "negatives_per_category": 0,
        "steps": 2,
        "image_size": SIZE,
        "batch_size": 2,
        "num_actors": 1,
        "gpus_per_actor": 0.0,
        "num_prompts": 3,
        "guidance_scale": 2.0,
    }
    generate.update(overrides)
    return build_config(
        {
            "output_dir": str(out),
            "dreambooth": {"base_model": str(sd), "mode": "full"},
            "generate": generate,
            "filter": {"enabled": False},
        }
    )


def _assert_complete(table, instances, per_instance):
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), f"duplicate image_id: {[i for i, n in Counter(ids).items() if n > 1]}"
    for instance_id in instances:
        pairs = zip(table["seed"].to_pylist(), table["instance_id"].to_pylist(), strict=True)
        seeds = sorted(s for s, i in pairs if i == instance_id)
        assert seeds == list(range(per_instance)), f"{instance_id}: seeds {seeds}"


@pytest.mark.slow
def test_sampler_actor_killed_mid_generation(ray_local, generate_workspace, zoo, monkeypatch, tmp_path):
    """The ImageSampler actor dies at its 2nd batch: 12 rows, 12 distinct ids, seeds 0..5 per instance."""
    from personalization.synthesis import sampler
    from pipelines import generate

    out = generate_workspace
    marker = tmp_path / "sampler-died"
    monkeypatch.setattr(sampler, "ImageSampler", faults.dying_class(sampler.ImageSampler, marker, after=1))
    cfg = _generate_cfg(out, zoo["stable_diffusion"])
    generate.run(cfg)
    assert faults.deaths(marker) == 1, "the fault was not injected"
    positives = out / "generate" / "positives"
    table = read_image_table(positives)
    assert table.num_rows == 2 * PER_INSTANCE
    assert [read_manifest(positives / i)["rows"] for i in ("mug_1", "mug_2")] == [PER_INSTANCE] * 2  # per instance
    _assert_complete(table, ["mug_1", "mug_2"], PER_INSTANCE)
    assert not list((out / "generate").glob(".*tmp-*")), "temporary build folders left behind"

    # The same rows as a run nothing killed, image for image (generation is seeded per row).
    monkeypatch.undo()
    clean = tmp_path / "clean"
    shutil.copytree(out / "ingest", clean / "ingest")
    shutil.copytree(out / "dreambooth", clean / "dreambooth")
    generate.run(_generate_cfg(clean, zoo["stable_diffusion"]))
    reference = read_image_table(clean / "generate" / "positives")

    # image ids hash the generator path, which differs between the two folders: compare by (instance, seed).
    def by_seed(t):
        return {
            (r["instance_id"], r["seed"]): r["image"] for r in t.select(["instance_id", "seed", "image"]).to_pylist()
        }

    assert by_seed(table) == by_seed(reference)


def _photo_rows(instances, role, source, count, seed):
    import numpy as np
    from PIL import Image

    from personalization.schema import make_image_id, make_row

    rng = np.random.default_rng(seed)
    rows = []
    for instance_id in instances:
        for k in range(count):
            image = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
            rows.append(
                make_row(
                    image_id=make_image_id(source, instance_id, k), instance_id=instance_id, category="mug",
                    role=role, source=source, split="train" if role == "real_train" else "", instance_split="test",
                    image=image, mask=None if role == "positive" else np.ones((SIZE, SIZE), bool), seed=k,
                    prompt=f"a <new1> mug, view {k}", cfg=5.0, generator=f"dreambooth/{instance_id}",
                )
            )  # fmt: skip
    return rows


@pytest.mark.slow
def test_scorer_actor_killed_mid_filter(ray_local, tmp_path, monkeypatch):
    """The DreamSim Scorer actor (tiny offline cache, real dreamsim package) dies at its 2nd batch of `filter`:
    every generated row is scored exactly once, with the score an unkilled run gives it."""
    from personalization.artifacts import commit_stage
    from personalization.schema import write_image_table
    from personalization.zoo.dreamsim import build_dreamsim_cache
    from pipelines import filter as filter_stage

    cache = build_dreamsim_cache(tmp_path / "zoo")
    instances = ["mug_1", "mug_2"]

    def workspace(out):
        write_image_table(_photo_rows(instances, "real_train", "real", 2, 0), out / "ingest" / "images.parquet")
        (out / "ingest" / "instances.json").write_text(
            json.dumps(dict.fromkeys(instances, {"category": "mug", "split": "test"}))
        )
        positives = _photo_rows(instances, "positive", "dreambooth", 4, 1)
        for i in instances:  # generate commits each instance's positives as its own unit
            rows = [r for r in positives if r["instance_id"] == i]
            write = lambda tmp, rows=rows: write_image_table(rows, tmp / "part.parquet")  # noqa: E731
            commit_stage(out / "generate" / "positives" / i, "generate/positives", {"instance": i}, write)
        filter_cfg = {"cache_dir": str(cache), "dreamsim_type": "clip_vitb32", "masker": "none", "batch_size": 2}
        return build_config({"output_dir": str(out), "filter": filter_cfg})

    marker = tmp_path / "scorer-died"
    monkeypatch.setattr(filter_stage, "Scorer", faults.dying_class(filter_stage.Scorer, marker, after=1))
    killed = filter_stage.run(workspace(tmp_path / "out"))
    assert faults.deaths(marker) == 1, "the fault was not injected"
    monkeypatch.undo()
    clean = filter_stage.run(workspace(tmp_path / "clean"))

    table, reference = read_image_table(killed), read_image_table(clean)
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 8 == sum(read_manifest(killed / i)["rows"] for i in instances)
    _assert_complete(table, instances, 4)
    assert table["score"].null_count == 0
    scores = dict(zip(ids, table["score"].to_pylist(), strict=True))
    assert scores == dict(zip(reference["image_id"].to_pylist(), reference["score"].to_pylist(), strict=True))
