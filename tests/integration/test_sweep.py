"""`personalize sweep` on local Ray (2 CPUs): ASHA over Train V2 trials, cached generation, resume, bad spaces."""

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from personalization.artifacts import read_manifest
from personalization.config import build_config, load_config
from pipelines import sweep


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from personalization.datasets import make_toy
    from personalization.zoo import build_zoo

    root = tmp_path_factory.mktemp("sweep")
    data = make_toy(root / "toy", categories=("mug", "tote"), val_per_category=2, test_per_category=1,
                    test_per_split=2, dense_per_instance=1, size=64)  # fmt: skip
    return root, data, build_zoo(root / "zoo", parts=["dinov2"])["dinov2"]


def _cfg(toy, out, **sections):
    root, data, dinov2 = toy
    layers = {
        "output_dir": str(root / out),
        "data": {"root": str(data)},
        "model": {"backbone": "dinov2_vitb14", "weights": str(dinov2), "image_size": 28},
        "cutpaste": {"images_per_instance": 4, "image_size": 64},
        "train": {"num_triplets": 8, "batch_size": 4, "epochs": 2, "num_workers": 1},
    }
    for section, values in sections.items():
        layers.setdefault(section, {}).update(values)
    return build_config(layers)


def _space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _rows(sweep_dir):
    with (sweep_dir / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_four_trial_asha_sweep_writes_table_plots_and_best(toy, tmp_path, ray_local):
    cfg = _cfg(toy, "asha")
    space = _space(
        tmp_path, "scheduler: asha\ngrace_period: 1\ntrain.learning_rate: {grid: [1.0e-5, 1.0e-4, 1.0e-3, 3.0e-2]}\n"
    )
    out = sweep.run(cfg, space)
    rows = _rows(out)
    assert len(rows) == 4
    assert sorted(float(r["train.learning_rate"]) for r in rows) == [1e-5, 1e-4, 1e-3, 3e-2]
    assert {r["status"] for r in rows} <= {"completed", "stopped early"} and rows[0]["status"] == "completed"
    assert all(0.0 <= float(r["val/pr_auc"]) <= 1.0 for r in rows)  # every trial reported after its first epoch
    # The selection metric is measured on a val instance, never on a test one.
    state = json.loads((out / "sweep.json").read_text())
    instances = json.loads((out / "shared" / "ingest" / "instances.json").read_text())
    assert instances[state["instance"]]["split"] == "val"
    # Upstream stages ran once; every trial reads them through links and commits only its own adapter.
    assert read_manifest(out / "shared" / "cutpaste" / state["instance"]) is not None
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 4
    for trial in trials:
        assert (trial / "ingest").is_symlink() and (trial / "cutpaste").resolve() == (out / "shared" / "cutpaste")
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert set(best) == {"train"} and set(best["train"]) == {"learning_rate"}
    assert load_config(out / "best.yaml").train.learning_rate == best["train"]["learning_rate"]
    assert (out / "plots" / "train.learning_rate.png").stat().st_size > 0


@pytest.mark.slow
def test_cfg_sweep_generates_each_value_once(toy, tmp_path, ray_local):
    from personalization.schema import read_image_table
    from personalization.zoo import build_zoo

    sd = build_zoo(toy[0] / "zoo", parts=["stable_diffusion"])["stable_diffusion"]
    cfg = _cfg(
        toy,
        "cfg",
        dreambooth={"enabled": True, "base_model": str(sd), "mode": "lora", "steps": 1, "resolution": 32,
                    "prior_preservation": False, "mixed_precision": "no", "use_8bit_adam": False,
                    "gradient_checkpointing": False, "train_text_encoder": False},
        generate={"enabled": True, "positives_per_instance": 2, "negatives_per_category": 0, "max_attempts": 2,
                  "steps": 2, "image_size": 32, "batch_size": 2, "num_actors": 1, "gpus_per_actor": 0.0,
                  "num_prompts": 2},
        filter={"enabled": False},
        train={"positive_sources": ["masked_dreambooth", "cutpaste"], "epochs": 1},
    )  # fmt: skip
    # Two CFG values x two samples = four trials, but only two generations.
    space = _space(tmp_path, "scheduler: fifo\nnum_samples: 2\ngenerate.cfg: {grid: [4.0, 7.5]}\n")
    out = sweep.run(cfg, space)
    rows = _rows(out)
    assert len(rows) == 4 and sorted(float(r["generate.cfg"]) for r in rows) == [4.0, 4.0, 7.5, 7.5]
    caches = sorted((out / "shared" / "generate-cache").iterdir())
    assert len(caches) == 2
    generated = {}
    for cache in caches:
        positives = cache / "generate" / "positives"
        table = read_image_table(positives)
        (instance,) = set(table["instance_id"].to_pylist())
        assert read_manifest(positives / instance)["rows"] == table.num_rows == 2  # one generator call per image
        (value,) = set(table["cfg"].to_pylist())
        generated[value] = read_manifest(positives / instance)["created"]
    assert sorted(generated) == [4.0, 7.5]
    # Each trial read the cache of its own value.
    for row in rows:
        link = (out / "trials" / row["trial_id"] / "generate").resolve()
        assert set(read_image_table(link / "positives")["cfg"].to_pylist()) == {float(row["generate.cfg"])}


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_tuner_restore(toy, tmp_path, ray_local):
    from ray import tune

    class CtrlC(tune.Stopper):
        """Presses Ctrl-C (a real SIGINT to this process) once, after the first trial result."""

        def __init__(self, marker):
            self.marker = str(marker)

        def __call__(self, trial_id, result):
            if not Path(self.marker).exists():
                Path(self.marker).write_text(trial_id)
                os.kill(os.getpid(), signal.SIGINT)
            return False

        def stop_all(self):
            return False

    cfg = _cfg(toy, "resume", train={"epochs": 2})
    space = _space(tmp_path, "scheduler: fifo\ntrain.loss: {grid: [infonce, hinge]}\n")
    try:
        sweep.run(cfg, space, stop=CtrlC(tmp_path / "interrupted"))
    except Exception as error:  # Tune reports the interruption; its state stays in OUT/sweep/tune
        print("interrupted:", error)
    assert (tmp_path / "interrupted").exists()
    tune_dir = Path(cfg.output_dir) / "sweep" / "tune"
    assert tune.Tuner.can_restore(str(tune_dir))
    # Running the same command again restores OUT/sweep/tune and finishes every trial.
    out = sweep.run(cfg, space)
    rows = _rows(out)
    assert sorted(r["train.loss"] for r in rows) == ["hinge", "infonce"]
    assert all(r["status"] == "completed" for r in rows)
    assert (tmp_path / "interrupted").read_text() in {r["trial_id"] for r in rows}


def test_unknown_space_key_fails_before_ray(toy, tmp_path, capsys):
    cfg = _cfg(toy, "bad")
    space = _space(tmp_path, "train.learning_rte: {grid: [1.0e-4]}\n")
    with pytest.raises(ValueError, match=r"'train\.learning_rte' is not a config field; valid train\.\* keys"):
        sweep.run(cfg, space)
    assert not (Path(cfg.output_dir) / "sweep").exists()  # nothing ran
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--space", str(space), f"output_dir={cfg.output_dir}"])
    assert exit_info.value.code == 2
    assert "train.learning_rte" in capsys.readouterr().err
    bad_cfg = _space(tmp_path, "generate.cfg: {grid: [4.0, 0.5]}\n")
    with pytest.raises(ValueError, match=r"generate\.cfg=0\.5 is not a valid config value"):
        sweep.run(cfg, bad_cfg)


def test_sweep_refuses_test_instances(toy):
    cfg = _cfg(toy, "x", data={"instances": ["mug_02"]})
    with pytest.raises(ValueError, match="never tunes on test instances"):
        sweep.choose_instance(cfg, {"mug_00": {"split": "val", "category": "mug"},
                                    "mug_02": {"split": "test", "category": "mug"}})  # fmt: skip
