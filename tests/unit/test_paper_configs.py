"""configs/paper/: each config loads, validates and passes the checks `personalize run` makes before any work, on
the tiny zoo; its header gives the paper's number (or says REFERENCE.md has none), its base, and exactly the keys
it changes from that base. No stage runs here."""

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from personalization.config import ConfigError, ExperimentConfig, load_config, to_dict
from personalization.config.layers import merge
from personalization.datasets import make_toy
from personalization.filtering.embedders import check_dreamsim_cache
from personalization.models.registry import get_spec, load_backbone
from personalization.synthesis.llm import ENV_VARS, LLMError
from personalization.synthesis.prompts import load_prompts
from personalization.synthesis.saved_generator import check_generator_dir
from personalization.zoo.dreamsim import DREAMSIM_TYPE
from pipelines.run import check_before_start

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
CONFIGS = sorted(PAPER.glob("*.yaml"))
BASE = PAPER / "table1_pods_dinov2.yaml"
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
NOT_CHANGES = {"name", "output_dir"}  # every file's own


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_zoo):
    root = tmp_path_factory.mktemp("paper")
    toy = make_toy(
        root / "toy", categories=("mug",), val_per_category=1, test_per_category=1, test_per_split=1,
        dense_per_instance=0, size=32,
    )  # fmt: skip
    zoo = tiny_zoo()
    negatives = root / "negatives"
    (negatives / "mug_negatives").mkdir(parents=True)
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"mug_01": ["a <new1> mug on a wooden desk", "a <new1> mug in the snow"]}))
    return SimpleNamespace(root=root, toy=toy, zoo=zoo, negatives=negatives, prompts=prompts, backbones={})


def _overrides(path: Path, world) -> list[str]:
    """The tiny zoo and toy in place of real weights and data, as the README's commands fill in real paths."""
    delta = yaml.safe_load(path.read_text())
    family = get_spec(delta.get("model", {}).get("backbone", "dinov2_vitb14")).family
    overrides = [
        f"data.root={world.toy}",
        f"output_dir={world.root / 'out' / path.stem}",
        f"model.weights={world.zoo[family]}",
        f"dreambooth.base_model={world.zoo['stable_diffusion']}",
        f"filter.cache_dir={world.zoo['dreamsim']}",
        f"filter.dreamsim_type={DREAMSIM_TYPE}",
        f"train.negatives_dir={world.negatives}",
    ]
    if "prompts_file" in delta.get("generate", {}):
        overrides.append(f"generate.prompts_file={world.prompts}")
    if delta.get("dreambooth", {}).get("use_8bit_adam") and not HAS_BNB:
        overrides.append("dreambooth.use_8bit_adam=false")  # test_8bit_adam_* covers the setting itself
    return overrides


def _header(path: Path) -> dict[str, str]:
    """The leading comment block as {field: text}; a field runs on over its indented continuation lines."""
    fields: dict[str, str] = {}
    last = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   ") and last:
            fields[last] += " " + line[4:].strip()
        elif ":" in line:
            last, _, text = line[2:].partition(":")
            fields[last] = text.strip()
    return fields


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resolved(path: Path) -> dict:
    """{dotted key: value} of the defaults with the file's deltas on top, as written (no machine's overrides)."""
    return _flat(merge(to_dict(ExperimentConfig()), yaml.safe_load(path.read_text())))


def test_the_folder_holds_every_experiment():
    names = {path.stem for path in CONFIGS}
    assert {f"table1_{d}_{b}" for d in ("pods", "dogs") for b in ("dinov2", "clip", "mae")} <= names
    for prefix in ("sources_real", "sources_cutpaste", "sources_masked_dreambooth", "sources_combined", "loss_",
                   "cfg_", "prompts_", "pairs_"):  # fmt: skip
        assert any(name.startswith(prefix) for name in names), prefix
    losses = {yaml.safe_load(p.read_text()).get("train", {}).get("loss", "infonce") for p in CONFIGS}
    assert losses == {"infonce", "multi_infonce", "hinge", "cross_entropy"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_passes_the_checks_before_work(path, world, monkeypatch):
    cfg = load_config(path, _overrides(path, world))
    assert cfg.name == path.stem
    if cfg.generate.prompt_source == "llm":  # its run line names the endpoint; without it, run stops at once
        for name in ENV_VARS:
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(LLMError, match=ENV_VARS[0]):
            check_before_start(cfg)
        for name in ENV_VARS:
            monkeypatch.setenv(name, "http://127.0.0.1:9/v1")
    check_before_start(cfg)
    if cfg.dreambooth.enabled:
        check_generator_dir(cfg.dreambooth.base_model)
    if cfg.generate.enabled and cfg.filter.enabled:
        check_dreamsim_cache(cfg.filter.cache_dir, cfg.filter.dreamsim_type)
    if cfg.generate.prompts_file:
        assert load_prompts(cfg.generate.prompts_file)
    if cfg.model.backbone not in world.backbones:  # one tiny load per backbone: its name and weights agree
        world.backbones[cfg.model.backbone] = load_backbone(get_spec(cfg.model.backbone), cfg.model.weights)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_header_names_the_paper_number_base_and_exact_changes(path):
    header = _header(path)
    assert re.search(r"\d+\.\d|no number in REFERENCE\.md", header["paper"]), header["paper"]
    assert f"--config configs/paper/{path.name} data.root=" in header["run"]
    if path == BASE:
        assert header["base"].startswith("defaults")
        return
    base_name, _, changes = header["base"].partition("; changes: ")
    assert base_name == BASE.name
    this, base = _resolved(path), _resolved(BASE)
    changed = {key for key in this if this[key] != base[key]} - NOT_CHANGES
    assert changed == set(changes.split(", "))


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed here")
def test_8bit_adam_configs_say_how_to_run_without_bitsandbytes(world):
    overrides = [o for o in _overrides(BASE, world) if not o.startswith("dreambooth.use_8bit_adam")]
    with pytest.raises(ConfigError, match=r"dreambooth\.use_8bit_adam: .*\.\[gpu\].*use_8bit_adam=false"):
        load_config(BASE, overrides)
