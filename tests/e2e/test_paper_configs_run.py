"""Every config in configs/paper/ runs end to end: `personalize run` (in this process, on the session's Ray) on a
one-object PODS-layout toy with the tiny zoo, and writes metrics for each test split.

The overrides only swap what a CPU box lacks: the weights (tiny zoo models), the sizes and counts (a few steps and
images, every side small) and 8-bit Adam where bitsandbytes is missing; every key a config changes from its base
reaches the run as written, except those swaps (checked against the run's saved config.yaml). The configs share one
output folder, walked in an order that keeps those with the same data stages together, so a committed stage is
reused (its config and input hashes are current) and each config pays only for what it changes.
generate.prompt_source=llm asks a local chat-completions endpoint served here, through the real client.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from chat_server import ChatServer
from PIL import Image

from personalization.config import ExperimentConfig, load_config, to_dict
from personalization.config.layers import merge
from personalization.datasets import TEST_SPLITS, make_toy
from personalization.models.registry import get_spec
from personalization.synthesis.llm import ENV_VARS
from personalization.zoo.dreamsim import ADAPTER, CHECKPOINT, DREAMSIM_TYPE
from pipelines import run

pytestmark = pytest.mark.slow

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
UPSTREAM = ("dreambooth", "generate", "filter", "cutpaste")  # the sections the data stages hash, in their order
# Keys a config may set that the run replaces: weights, the dense side (scaled), 8-bit Adam without bitsandbytes.
SWAPPED = {"output_dir", "filter.sam_weights", "evaluate.dense_image_size", "dreambooth.use_8bit_adam"}
TINY = [
    "dreambooth.steps=1", "dreambooth.resolution=32", "dreambooth.class_images=1",
    "generate.positives_per_instance=2", "generate.negatives_per_category=2", "generate.max_attempts=2",
    "generate.num_prompts=2", "generate.steps=1", "generate.image_size=32", "generate.batch_size=2",
    "cutpaste.images_per_instance=2", "cutpaste.image_size=32", "cutpaste.num_backgrounds=2",
    "train.num_triplets=2", "train.batch_size=2", "train.epochs=1", "evaluate.batch_size=8",
]  # fmt: skip
TINY_IMAGE = {"dinov2": 56, "clip": 32, "mae": 32}  # the zoo models' own input sides
DENSE_SCALE = 8  # the paper's 896 / 1024 px dense side (a 64-patch grid) -> 112 / 128 px


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def _delta(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _resolved(path: Path) -> dict:
    """The code defaults with the file's deltas on top, as written (no overrides; nothing validated)."""
    return merge(to_dict(ExperimentConfig()), _delta(path))


def _upstream(path: Path) -> str:
    """What the data stages of ``path`` hash, as text: equal for configs that can share them."""
    resolved = _resolved(path)
    return json.dumps([resolved[section] for section in UPSTREAM], sort_keys=True, default=str)


CONFIGS = sorted(PAPER.glob("*.yaml"), key=lambda p: (_upstream(p), p.name))
# `make test` runs the base (every data stage of the recipe: DreamBooth, generation, SAM-masked DreamSim filter,
# generated Cut-and-Paste backgrounds); the others are marked `paper`: `make test-paper` walks the whole folder
# (about 20 minutes on a 2-core CPU, most of it Ray start-up per config, so not in every test run).
BASE = "table1_pods_dinov2"
CASES = [pytest.param(p, id=p.stem, marks=() if p.stem == BASE else pytest.mark.paper) for p in CONFIGS]


def _prompts(body: dict) -> str:
    """The local LLM's answer: a few prompts for the category the request names."""
    category = body["messages"][0]["content"].split("'<new1> ")[1].split("'")[0]
    return "\n".join(f"{k}. a <new1> {category} {place}" for k, place in enumerate(("on a shelf", "in the rain")))


def _accepting_dreamsim(zoo_dreamsim: Path, out: Path) -> Path:
    """The zoo's DreamSim with a final LayerNorm that ignores its input (weight 0, a fixed bias): every image embeds
    alike and scores 1.0, so the filter keeps every generated image at the configs' thresholds, as a trained
    DreamSim keeps a trained generator's (the random zoo one scores about 0 and would reject them all)."""
    out.mkdir()
    checkpoint = torch.load(zoo_dreamsim / CHECKPOINT, weights_only=True)
    state = checkpoint["state_dict"]
    state["norm.weight"].zero_()
    state["norm.bias"].copy_(torch.linspace(-1.0, 1.0, state["norm.bias"].numel()))
    torch.save(checkpoint, out / CHECKPOINT)
    (out / ADAPTER).symlink_to(zoo_dreamsim / ADAPTER)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_zoo):
    root = tmp_path_factory.mktemp("paper_run")
    toy = make_toy(root / "toy", categories=("mug",), val_per_category=1, test_per_category=1, test_per_split=1,
                   dense_per_instance=1, size=64)  # fmt: skip
    zoo = tiny_zoo()
    negatives = root / "negatives" / "mug_negatives"  # the released PODS negatives' layout
    negatives.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(negatives / f"{k}.png")
    chat = ChatServer(_prompts)
    yield SimpleNamespace(root=root, toy=toy, zoo=zoo, negatives=negatives.parent, chat=chat,
                          dreamsim=_accepting_dreamsim(zoo["dreamsim"], root / "dreamsim"))  # fmt: skip
    chat.close()


def _overrides(path: Path, world) -> list[str]:
    delta = _delta(path)
    family = get_spec(delta.get("model", {}).get("backbone", "dinov2_vitb14")).family
    dense = _resolved(path)["evaluate"]["dense_image_size"] // DENSE_SCALE
    overrides = [
        f"data.root={world.toy}", f"output_dir={world.root / 'out'}",
        f"model.weights={world.zoo[family]}", f"model.image_size={TINY_IMAGE[family]}",
        f"dreambooth.base_model={world.zoo['stable_diffusion']}", f"filter.sam_weights={world.zoo['sam']}",
        f"filter.cache_dir={world.dreamsim}", f"filter.dreamsim_type={DREAMSIM_TYPE}",
        f"evaluate.dense_image_size={dense}", *TINY,
    ]  # fmt: skip
    if delta.get("train", {}).get("negatives") == "folder":
        overrides.append(f"train.negatives_dir={world.negatives}")
    if delta.get("dreambooth", {}).get("use_8bit_adam") and not HAS_BNB:
        overrides.append("dreambooth.use_8bit_adam=false")  # tests/unit/test_paper_configs.py covers the setting
    return overrides


def _check_metrics(summary: dict, tasks: tuple[str, ...]) -> None:
    for model in ("pretrained", "personalized"):
        metrics = summary["metrics"][model]
        assert {key.split("/")[0] for key in metrics} == set(tasks), metrics
        assert all(0.0 <= v <= 1.0 for v in metrics.values() if not math.isnan(v)), metrics
        assert not math.isnan(metrics["classification/pr_auc"])
        assert sorted(summary["per_split"][model]) == sorted(TEST_SPLITS)  # the toy has every PODS test split
        for split in TEST_SPLITS:
            assert 0.0 <= summary["per_split"][model][split]["classification/pr_auc"] <= 1.0


@pytest.mark.parametrize("path", CASES)
def test_paper_config_runs_end_to_end(path, world, ray_local, monkeypatch):
    for name, value in zip(ENV_VARS, (world.chat.base_url, "local", "tiny-llm"), strict=True):
        monkeypatch.setenv(name, value)
    asked = len(world.chat.requests)
    cfg = load_config(path, _overrides(path, world))
    out = run.run(cfg)

    saved = _flat(yaml.safe_load((out / "config.yaml").read_text()))
    changed = {key: value for key, value in _flat(_delta(path)).items() if key not in SWAPPED}
    assert {key: saved[key] for key in changed} == changed  # the recipe reaches the run as written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instances"] == ["mug_01"] and summary["failed"] == {}
    assert summary["backbone"] == cfg.model.backbone
    assert summary["negatives"] == cfg.train.negatives
    _check_metrics(summary, cfg.evaluate.tasks)
    adapter = out / "train" / "mug_01" / "adapter_model.safetensors"
    assert adapter.is_file()
    if cfg.generate.enabled and cfg.generate.prompt_source == "llm":
        assert len(world.chat.requests) > asked  # the prompts came from the endpoint
        prompts = json.loads((out / "generate" / "prompts.json").read_text())
        assert prompts["mug_01"] == ["a <new1> mug on a shelf", "a <new1> mug in the rain"]
