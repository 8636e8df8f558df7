"""`personalize train` through real Ray Train (TorchTrainer, 2 CPU workers, gloo DDP) on a tiny peft model."""

import contextlib
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torchvision import transforms

from personalization.config import build_config, replace
from personalization.contrastive.triplets import TripletError
from personalization.schema import make_image_id, make_row, write_image_table
from pipelines import train, training

# Ray workers cannot import this test module by name: ship the tiny model builder by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TinyEncoder(nn.Module):
    """A small real encoder with the Encoder contract: (B, 3, H, W) -> (B, D) unit vectors."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3 * 4 * 4, 32)
        self.proj = nn.Linear(32, 16)

    def forward(self, pixels):
        x = F.adaptive_avg_pool2d(pixels, 4).flatten(1)
        return F.normalize(self.proj(torch.relu(self.embed(x))), dim=-1)


def build_tiny(cfg):
    torch.manual_seed(123)  # the "pretrained" base: the same on every rank and in every run
    base = TinyEncoder()
    lora = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["embed", "proj"], init_lora_weights=False)
    # Distinct LoRA init per worker would be a bug DDP hides; the loop seeds from cfg.seed before this call.
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, lora)
    transform = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
    return train.TrainableModel(model, transform, lambda m, out: m.save_pretrained(out))


def _image(rng, color):
    pixels = rng.integers(0, 60, size=(24, 24, 3)) + np.array(color)
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture
def upstream(tmp_path):
    """OUT/ingest (one test + one val mug, 3 photos each) and OUT/cutpaste (composites of both)."""
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    instances = {"mug_1": {"category": "mug", "split": "test"}, "mug_v": {"category": "mug", "split": "val"},
                 "shoe_v": {"category": "shoe", "split": "val"}}  # fmt: skip
    colors = {"mug_1": (190, 20, 20), "mug_v": (20, 20, 190), "shoe_v": (20, 190, 20)}
    real, composites = [], []
    for instance, info in instances.items():
        common = dict(instance_id=instance, category=info["category"], instance_split=info["split"])
        for k in range(3):
            image = _image(rng, colors[instance])
            real.append(make_row(image_id=make_image_id("real", instance, k), role="real_train", source="real",
                                 split="train", image=_to_pil(image), **common))  # fmt: skip
        for k in range(6):
            image = _image(rng, colors[instance])
            composites.append(make_row(image_id=make_image_id("cutpaste", instance, k), role="positive",
                                       source="cutpaste", image=_to_pil(image), seed=k, **common))  # fmt: skip
    (out / "ingest").mkdir(parents=True)
    write_image_table(real, out / "ingest" / "images.parquet")
    (out / "ingest" / "instances.json").write_text(json.dumps(instances))
    write_image_table(composites, out / "cutpaste" / "part-0.parquet")
    return out


def _to_pil(array):
    from PIL import Image

    return Image.fromarray(array)


def _cfg(out, **train_overrides):
    train_cfg = dict(num_triplets=32, batch_size=8, epochs=1, num_workers=2, checkpoint_every=2, learning_rate=1e-2)
    train_cfg.update(train_overrides)
    return build_config({"output_dir": str(out), "model": {"image_size": 16}, "train": train_cfg})


def test_two_worker_ddp_trains_identical_replicas(ray_local, upstream):
    before = set(ray_local._private.state.actors())
    out = train.run(_cfg(upstream), build_model=build_tiny)
    # The run's actors: Ray Train's own, less the DatasetManager it starts for Ray Datasets, which the workers
    # never use (training._trainer_class; a Ray upgrade that renames its callbacks fails here).
    started = [a["ActorClassName"] for key, a in ray_local._private.state.actors().items() if key not in before]
    assert "DatasetManager" not in started
    assert {"TrainController", "RayTrainWorker", "SynchronizationActor", "PlacementGroupCleaner"} <= set(started)
    folder = out / "mug_1"
    metrics = json.loads((folder / "metrics.json").read_text())
    steps = 32 // 8  # global batch 8 = 2 workers x 4
    assert metrics["steps"] == steps and len(metrics["loss"]) == steps and metrics["start_step"] == 0
    assert all(np.isfinite(metrics["loss"])) and metrics["samples_per_s"] > 0
    assert len(metrics["replica_hashes"]) == 2 and len(set(metrics["replica_hashes"])) == 1
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "config.yaml").is_file() and (folder / "_manifest.json").is_file()
    # The rows the driver read and handed to the workers: exactly the triplets' images, mug_1's own and those of
    # its val negative mug_v (never shoe_v's, the other category's).
    cfg = train.resolve_negatives(_cfg(upstream))
    inputs = out / ".ray" / "mug_1" / f"{training.run_name(cfg, 'mug_1', training.stage_inputs(cfg))}.inputs"
    rows = pq.read_table(inputs / "rows.parquet")
    triplets = json.loads((inputs / "triplets.json").read_text())
    assert sorted(rows["image_id"].to_pylist()) == sorted({i for t in triplets for i in t})
    assert set(rows["instance_id"].to_pylist()) == {"mug_1", "mug_v"}

    # The saved adapter loads with stock peft onto the same base, and it moved away from its initialization.
    torch.manual_seed(123)
    base = TinyEncoder()
    loaded = PeftModel.from_pretrained(base, folder)
    initial = build_tiny(_cfg(upstream)).model
    lora = {k: v for k, v in loaded.named_parameters() if "lora_" in k}
    assert lora and any(not torch.equal(v, dict(initial.named_parameters())[k]) for k, v in lora.items())


def test_resume_continues_from_the_last_checkpoint(ray_local, upstream):
    cfg = _cfg(upstream, num_workers=1, batch_size=8, num_triplets=16, checkpoint_every=1)
    first = json.loads((train.run(cfg, build_model=build_tiny) / "mug_1" / "metrics.json").read_text())
    steps = 16 // 8
    assert first["steps"] == steps and first["start_step"] == 0
    # Twice the epochs: the same Ray Train run restores its last checkpoint and continues from step N.
    longer = train.run(replace(cfg, **{"train.epochs": 2}), build_model=build_tiny)
    resumed = json.loads((longer / "mug_1" / "metrics.json").read_text())
    assert resumed["start_step"] == steps and resumed["steps"] == 2 * steps
    assert resumed["loss"][:steps] == first["loss"] and len(resumed["loss"]) == 2 * steps


@pytest.mark.slow
def test_deepspeed_zero1_on_cpu(ray_local, upstream):
    cfg = _cfg(upstream, num_workers=1, num_triplets=16, strategy="deepspeed", zero_stage=1, checkpoint_every=1)
    folder = train.run(cfg, build_model=build_tiny) / "mug_1"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 2 and all(np.isfinite(metrics["loss"]))
    assert (folder / "adapter_model.safetensors").is_file()
    longer = train.run(replace(cfg, **{"train.epochs": 2}), build_model=build_tiny)
    resumed = json.loads((longer / "mug_1" / "metrics.json").read_text())
    assert resumed["start_step"] == 2 and resumed["steps"] == 4 and resumed["loss"][:2] == metrics["loss"]


def test_default_builder_trains_a_lora_dinov2_from_the_zoo(ray_local, upstream, tiny_zoo):
    """The production path: build_encoder + apply_lora + build_transform + save_adapter, on a tiny random DINOv2."""
    weights = tiny_zoo(["dinov2"])["dinov2"]
    cfg = build_config(
        {
            "output_dir": str(upstream),
            "model": {"backbone": "dinov2_vitb14", "weights": str(weights), "image_size": 28},
            "train": {"num_triplets": 8, "batch_size": 4, "epochs": 1, "num_workers": 1},
        }
    )
    folder = train.run(cfg) / "mug_1"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 2 and all(np.isfinite(metrics["loss"]))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (folder / "adapter_model.safetensors").is_file()


def test_bad_input_fails_before_training(upstream, tmp_path):
    with pytest.raises(ValueError, match="not in"):
        train.run(build_config({"output_dir": str(upstream), "data": {"instances": ["cup_9"]}}))
    with pytest.raises(FileNotFoundError, match="personalize ingest"):
        train.run(build_config({"output_dir": str(tmp_path / "empty")}))
    # Only the val instances have composites: the test instance has no synthetic positives.
    cfg = build_config({"output_dir": str(upstream), "dreambooth": {"masked": False},
                        "generate": {"enabled": True, "negatives_per_category": 0},
                        "train": {"positive_sources": ["dreambooth"]}})  # fmt: skip
    (upstream / "generate").mkdir()
    with pytest.raises(TripletError, match="no synthetic positives for instance mug_1"):
        train.run(cfg)


def test_val_negatives_are_same_category_val_instances(upstream):
    from personalization.contrastive.data import select_training_rows
    from personalization.schema import read_image_table

    cfg = train.resolve_negatives(_cfg(upstream))  # train.negatives=auto: the dataset has val instances
    assert cfg.train.negatives == "val"
    instances = json.loads((upstream / "ingest" / "instances.json").read_text())
    rows = select_training_rows(
        read_image_table(upstream / "ingest"), read_image_table(upstream / "cutpaste"), "mug_1", cfg.train, instances
    )
    by_id = dict(zip(rows.table["image_id"].to_pylist(), rows.table["instance_id"].to_pylist(), strict=True))
    assert {by_id[i] for i in rows.anchor_ids} == {"mug_1"} and len(rows.anchor_ids) == 3
    assert {by_id[i] for i in rows.positive_ids} == {"mug_1"} and len(rows.positive_ids) == 6
    assert {by_id[i] for i in rows.negative_ids} == {"mug_v"} and len(rows.negative_ids) == 3 + 6


def _committed(folder, rows):
    from personalization.artifacts import commit_stage

    commit_stage(folder, "test", {"unit": folder.name}, lambda tmp: write_image_table(rows, tmp / "part.parquet"))


@pytest.fixture
def four_mugs(tmp_path):
    """OUT with 4 test mugs and 1 val mug, each with its own committed cutpaste and generated-positive units
    (64 px noise, scored), and generated negatives for two categories."""
    out = tmp_path / "out"
    rng = np.random.default_rng(1)
    instances = {f"mug_{k}": {"category": "mug", "split": "test"} for k in range(4)}
    instances |= {"mug_v": {"category": "mug", "split": "val"}}
    real = []
    for instance, info in instances.items():
        common = dict(instance_id=instance, category="mug", instance_split=info["split"])
        noise = lambda: _to_pil(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # noqa: E731
        real += [make_row(image_id=make_image_id("real", instance, k), role="real_train", source="real",
                          split="train", image=noise(), **common) for k in range(2)]  # fmt: skip
        _committed(out / "cutpaste" / instance, [make_row(image_id=make_image_id("cp", instance, k), role="positive",
                   source="cutpaste", image=noise(), **common) for k in range(8)])  # fmt: skip
        generated = [make_row(image_id=make_image_id("gen", instance, k), role="positive", source="dreambooth",
                              image=noise(), score=k / 8, **common) for k in range(8)]  # fmt: skip
        _committed(out / "generate" / "positives" / instance, generated)
    for category in ("mug", "shoe"):
        _committed(out / "generate" / "negatives" / category, [make_row(image_id=make_image_id("neg", category, k),
                   instance_id=f"{category}_negatives", category=category, role="negative", source="pretrained",
                   image=_to_pil(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))) for k in range(8)])  # fmt: skip
    (out / "ingest").mkdir(parents=True)
    write_image_table(real, out / "ingest" / "images.parquet")
    (out / "ingest" / "instances.json").write_text(json.dumps(instances))
    return out, instances


def test_rows_are_read_per_instance_with_pushdown(four_mugs):
    """The driver's reads for mug_k hold mug_k's positives only (and its category's negatives), and the Arrow
    memory they take at their peak is a fraction of reading every instance's rows."""
    from personalization.contrastive.data import ID_COLUMNS
    from personalization.schema import read_image_table

    out, instances = four_mugs
    cfg = build_config({"output_dir": str(out), "dreambooth": {"masked": False},
                        "generate": {"enabled": True, "negatives_per_category": 8},
                        "filter": {"threshold": 0.5}, "train": {"negatives": "generated", "num_triplets": 8,
                        "positive_sources": ["cutpaste", "dreambooth"]}})  # fmt: skip
    inputs = training.stage_inputs(cfg)
    with _arrow_peak() as plan_and_run:
        for k in range(4):
            instance = f"mug_{k}"
            planned = training.instance_rows(cfg, instance, instances, inputs, columns=ID_COLUMNS)
            assert planned.table.column_names == list(ID_COLUMNS)  # the plan reads no image bytes
            by_id = dict(zip(planned.table["image_id"].to_pylist(), planned.table["instance_id"].to_pylist(),
                             strict=True))  # fmt: skip
            assert {by_id[i] for i in planned.positive_ids} == {instance}
            assert {by_id[i] for i in planned.negative_ids} == {"mug_negatives"}
            assert set(by_id.values()) == {instance, "mug_negatives"}
            # 8 composites + the 4 generated positives scoring >= 0.5 (filter.threshold, applied on read)
            assert len(planned.positive_ids) == 8 + 4 and len(planned.negative_ids) == 8
            used = {planned.positive_ids[0], planned.negative_ids[0], planned.anchor_ids[0]}
            run_rows = training.instance_rows(cfg, instance, instances, inputs, image_ids=used)
            assert set(run_rows.table["image_id"].to_pylist()) == used
    with _arrow_peak() as whole:  # what the driver held before: every instance's rows at once
        read_image_table([out / "cutpaste", out / "generate", out / "ingest"])
    assert plan_and_run() < whole() / 2


_POOLS = []  # a proxy pool must outlive every buffer it allocated (freeing into a dead pool crashes)


@contextlib.contextmanager
def _arrow_peak():
    """Arrow's peak allocation (bytes) inside the block, through a proxy of the default memory pool."""
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)
    _POOLS.append(pool)
    pa.set_memory_pool(pool)
    try:
        yield pool.max_memory
    finally:
        pa.set_memory_pool(previous)
