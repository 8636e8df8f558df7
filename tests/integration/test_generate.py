import io
import json

import numpy as np
import pytest
from PIL import Image
from tiny_ingest import write_ingest

from personalization.artifacts import read_manifest
from personalization.config import build_config
from personalization.schema import make_image_id, read_image_table
from personalization.synthesis.dreambooth import train_dreambooth
from personalization.synthesis.generation_rows import SamplerError, generator_key
from personalization.zoo.diffusion import build_stable_diffusion
from pipelines import generate

SIZE = 32
INSTANCES = {"mug_1": "mug", "mug_2": "mug", "shoe_1": "shoe"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SD, an ingest folder (3 instances, 2 categories) and LoRA DreamBooth generators for each."""
    root = tmp_path_factory.mktemp("gen")
    sd = build_stable_diffusion(root / "zoo")
    out = root / "out"
    photos = write_ingest(out, INSTANCES, size=SIZE, mask="full")
    for seed, (iid, category) in enumerate(INSTANCES.items()):
        train_dreambooth(
            sd,
            photos[iid],
            category,
            out / "dreambooth" / iid,
            mode="lora",
            steps=1,
            learning_rate=5e-2,
            resolution=SIZE,
            lora_rank=4,
            seed=seed,
        )
    return sd, out


def _cfg(sd, out, filter_cfg=None, **generate_overrides):
    generate_cfg = {
        "positives_per_instance": 3,
        "negatives_per_category": 2,
        "max_attempts": 6,
        "steps": 2,
        "image_size": SIZE,
        "batch_size": 2,
        "num_actors": 2,
        "gpus_per_actor": 0.0,
        "num_prompts": 4,
        "guidance_scale": 4.0,
        "enabled": True,
    }
    generate_cfg.update(generate_overrides)
    return build_config(
        {
            "output_dir": str(out),
            "dreambooth": {"base_model": str(sd), "mode": "lora"},
            "generate": generate_cfg,
            "filter": {"enabled": False},
        }
    )


@pytest.mark.slow
def test_generate_writes_positives_and_shared_negatives(workspace, ray_local):
    sd, out = workspace
    cfg = _cfg(sd, out)
    generate.run(cfg)
    positives = read_image_table(out / "generate" / "positives")
    assert positives.num_rows == 9
    assert set(positives["role"].to_pylist()) == {"positive"}
    assert set(positives["source"].to_pylist()) == {"masked_dreambooth"}
    for iid in INSTANCES:
        mine = [r for r in positives.to_pylist() if r["instance_id"] == iid]
        assert sorted(r["seed"] for r in mine) == [0, 1, 2]
        for r in mine:
            assert "<new1>" in r["prompt"] and INSTANCES[iid] in r["prompt"]
            assert r["generator"] == str(out / "dreambooth" / iid)
            key = generator_key(r["generator"])
            assert str(out) not in key  # ids do not change when the output folder moves
            assert r["image_id"] == make_image_id("generated", key, r["prompt"], r["seed"], 4.0, 2, SIZE)
            assert np.asarray(Image.open(io.BytesIO(r["image"]))).shape == (SIZE, SIZE, 3)
            assert r["score"] is None and r["instance_split"] == "test"
    assert len(set(positives["image_id"].to_pylist())) == 9
    # Negatives: once per category, however many instances share it.
    negatives = read_image_table(out / "generate" / "negatives")
    assert sorted(negatives["instance_id"].to_pylist()) == ["mug_negatives"] * 2 + ["shoe_negatives"] * 2
    assert set(negatives["prompt"].to_pylist()) == {"a photo of mug", "a photo of shoe"}
    assert set(negatives["source"].to_pylist()) == {"pretrained"}
    for category in ("mug", "shoe"):
        assert read_manifest(out / "generate" / "negatives" / category)["rows"] == 2

    # A rerun from scratch makes the same rows, byte for byte.
    before = {r["image_id"]: r["image"] for r in positives.to_pylist() + negatives.to_pylist()}
    for folder in ("positives", "negatives"):
        import shutil

        shutil.rmtree(out / "generate" / folder)
    generate.run(cfg)
    again = read_image_table(out / "generate")
    assert {r["image_id"]: r["image"] for r in again.to_pylist()} == before

    # Each instance's positives are a unit of their own: one lost to a crash (no manifest, a scratch folder
    # left behind) is generated again alone, and the others are not touched.
    units = {i: read_manifest(out / "generate" / "positives" / i) for i in INSTANCES}
    assert [m["rows"] for m in units.values()] == [3, 3, 3]
    (out / "generate" / "positives" / "mug_2" / "_manifest.json").unlink()
    (out / "generate" / "positives" / ".mug_2.partial").mkdir()
    generate.run(cfg)
    assert all(read_manifest(out / "generate" / "positives" / i) == units[i] for i in ("mug_1", "shoe_1"))
    assert read_manifest(out / "generate" / "positives" / "mug_2")["rows"] == 3
    assert not (out / "generate" / "positives" / ".mug_2.partial").exists()
    assert {r["image_id"]: r["image"] for r in read_image_table(out / "generate").to_pylist()} == before


def test_bad_input_fails_before_any_actor(workspace, tmp_path):
    sd, out = workspace
    with pytest.raises(SamplerError, match="neither a diffusers folder"):
        generate.run(
            build_config(
                {"output_dir": str(out), "dreambooth": {"base_model": str(tmp_path)}, "generate": {"enabled": True}}
            )
        )
    with pytest.raises(Exception, match=r"generate\.guidance_scale: classifier-free guidance must be >= 1"):
        _cfg(sd, out, guidance_scale=0.5)
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps({"mug_1": ["a mug"], "mug_2": ["a <new1> mug"], "shoe_1": ["a <new1> shoe"]}))
    with pytest.raises(ValueError, match=r"prompts\.json.*mug_1.*<new1>"):
        generate.run(_cfg(sd, out, prompts_file=str(bad)))
    from personalization.filtering import EmbedderError

    cfg = build_config(
        {
            "output_dir": str(out),
            "dreambooth": {"base_model": str(sd)},
            "generate": {"enabled": True, "positives_per_instance": 1, "max_attempts": 2},
            "filter": {"cache_dir": str(tmp_path / "none"), "dreamsim_type": "clip_vitb32"},
        }
    )
    with pytest.raises(EmbedderError, match="lacks"):
        generate.run(cfg)


def test_filtered_generation_stops_once_n_accepted(workspace, ray_local, tmp_path):
    """Scored by the real dreamsim package through the tiny cache; stops at N accepted or M attempts."""
    import shutil

    from personalization.zoo.dreamsim import build_dreamsim_cache

    sd, out = workspace
    work = tmp_path / "out"
    shutil.copytree(out / "ingest", work / "ingest")
    shutil.copytree(out / "dreambooth" / "mug_1", work / "dreambooth" / "mug_1")
    cache = build_dreamsim_cache(tmp_path / "zoo")
    n, attempts = 2, 6
    for threshold in (0.0, 1.0):
        filter_cfg = {
            "enabled": True,
            "cache_dir": str(cache),
            "dreamsim_type": "clip_vitb32",
            "masker": "patch",
            "threshold": threshold,
            "num_actors": 1,
            "batch_size": 2,
        }
        cfg = build_config(
            {
                "output_dir": str(work / str(threshold)),
                "data": {"instances": ["mug_1"]},
                "dreambooth": {"base_model": str(sd), "mode": "lora"},
                "filter": filter_cfg,
                "generate": {
                    "enabled": True,
                    "positives_per_instance": n,
                    "max_attempts": attempts,
                    "negatives_per_category": 0,
                    "steps": 2,
                    "image_size": SIZE,
                    "batch_size": 2,
                    "num_actors": 1,
                    "gpus_per_actor": 0.0,
                },
            }
        )
        (work / str(threshold)).mkdir(parents=True)
        shutil.copytree(work / "ingest", work / str(threshold) / "ingest")
        shutil.copytree(work / "dreambooth", work / str(threshold) / "dreambooth")
        generate.run(cfg)
        shards = sorted((work / str(threshold) / "generate" / "positives").rglob("part-*.parquet"))
        tables = [read_image_table(s) for s in shards]
        scores = [[v for v in t["score"].to_pylist()] for t in tables]
        assert all(v is not None for part in scores for v in part)
        accepted = [sum(v >= threshold for v in part) for part in scores]
        total = sum(len(part) for part in scores)
        if total < attempts:  # it stopped early: only because the last shard reached N
            assert sum(accepted) >= n and sum(accepted[:-1]) < n
        else:
            assert total == attempts and sum(accepted[:-1]) < n
        kept = read_image_table(work / str(threshold) / "generate", min_score=threshold)
        assert kept.num_rows == sum(accepted)


def test_filter_stage_rescores_generated_positives(workspace, ray_local, tmp_path):
    import shutil

    from personalization.zoo.dreamsim import build_dreamsim_cache
    from pipelines import filter as filter_stage

    sd, out = workspace
    work = tmp_path / "out"
    shutil.copytree(out / "ingest", work / "ingest")
    shutil.copytree(out / "dreambooth" / "mug_1", work / "dreambooth" / "mug_1")
    cache = build_dreamsim_cache(tmp_path / "zoo")
    settings = {
        "output_dir": str(work),
        "data": {"instances": ["mug_1"]},
        "dreambooth": {"base_model": str(sd), "mode": "lora"},
        "generate": {
            "enabled": True,
            "positives_per_instance": 2,
            "max_attempts": 2,
            "negatives_per_category": 0,
            "steps": 2,
            "image_size": SIZE,
            "batch_size": 2,
            "num_actors": 1,
            "gpus_per_actor": 0.0,
        },
        "filter": {
            "enabled": False,
            "cache_dir": str(cache),
            "dreamsim_type": "clip_vitb32",
            "masker": "none",
            "batch_size": 2,
        },
    }
    generate.run(build_config(settings))
    unscored = read_image_table(work / "generate" / "positives")
    assert unscored.num_rows == 2 and unscored["score"].null_count == 2
    filter_stage.run(build_config(settings))
    scored = read_image_table(work / "filter")
    assert sorted(scored["image_id"].to_pylist()) == sorted(unscored["image_id"].to_pylist())
    assert scored["score"].null_count == 0
    assert all(-1.0 <= s <= 1.0 for s in scored["score"].to_pylist())
