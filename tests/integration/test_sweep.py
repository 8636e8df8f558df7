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
from personalization.errors import UserError
from personalization.sweeps import load_space
from pipelines import sweep


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_zoo):
    from personalization.datasets import make_toy

    root = tmp_path_factory.mktemp("sweep")
    data = make_toy(root / "toy", categories=("mug", "tote"), val_per_category=2, test_per_category=1,
                    test_per_split=2, dense_per_instance=1, size=64)  # fmt: skip
    return root, data, tiny_zoo(["dinov2"])["dinov2"]


@pytest.fixture(scope="module")
def mugs(toy):
    """Four val mugs: two probes share a category, so val negatives could reach the other probe if not kept out."""
    from personalization.datasets import make_toy

    root, _, dinov2 = toy
    data = make_toy(root / "mugs", categories=("mug",), val_per_category=4, test_per_category=1, test_per_split=2,
                    dense_per_instance=1, size=64)  # fmt: skip
    return root, data, dinov2


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
        tmp_path,
        "scheduler: asha\ngrace_period: 1\nval_objects: 2\n"
        "train.learning_rate: {grid: [1.0e-5, 1.0e-4, 1.0e-3, 3.0e-2]}\n",
    )
    # Two one-worker trials at a time on the 2 CPUs: a trial's own process holds no CPU, only memory.
    parsed = load_space(space, cfg)
    assert sweep.trial_resources(parsed) == {"memory": sweep.TRIAL_MEMORY}
    assert sweep.runs_that_fit(sweep.trial_needs(parsed, cfg)) == 2
    out = sweep.run(cfg, space)
    rows = _rows(out)
    assert len(rows) == 4
    assert sorted(float(r["train.learning_rate"]) for r in rows) == [1e-5, 1e-4, 1e-3, 3e-2]
    assert {r["status"] for r in rows} <= {"completed", "stopped early"} and rows[0]["status"] == "completed"
    assert all(0.0 <= float(r["val/pr_auc"]) <= 1.0 for r in rows)  # every trial reported after its first epoch
    # The selection metric is measured on val objects, never on test ones.
    state = json.loads((out / "sweep.json").read_text())
    instances = json.loads((out / "shared" / "ingest" / "instances.json").read_text())
    assert {instances[i]["split"] for i in state["probes"] + state["pool"]} == {"val"}
    # Upstream stages ran once; every trial reads them through links and commits only its own adapters.
    assert all(read_manifest(out / "shared" / "cutpaste" / probe) is not None for probe in state["probes"])
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 4
    for trial in trials:
        assert (trial / "ingest").is_symlink() and (trial / "cutpaste").resolve() == (out / "shared" / "cutpaste")
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert set(best) == {"train"} and set(best["train"]) == {"learning_rate"}
    assert load_config(out / "best.yaml").train.learning_rate == best["train"]["learning_rate"]
    assert (out / "plots" / "train.learning_rate.png").stat().st_size > 0


@pytest.mark.slow
def test_cfg_sweep_generates_each_value_once(toy, tmp_path, ray_local, tiny_zoo):
    from personalization.schema import read_image_table

    sd = tiny_zoo(["stable_diffusion"])["stable_diffusion"]
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
        cutpaste={"num_backgrounds": 2},  # generated (generation is on): two tiny ones
        train={"positive_sources": ["masked_dreambooth", "cutpaste"], "epochs": 1},
    )  # fmt: skip
    # Two CFG values x two samples = four trials, but only two generations.
    space = _space(
        tmp_path, "scheduler: fifo\nnum_samples: 2\nval_objects: 2\ngenerate.guidance_scale: {grid: [4.0, 7.5]}\n"
    )
    out = sweep.run(cfg, space)
    rows = _rows(out)
    assert len(rows) == 4 and sorted(float(r["generate.guidance_scale"]) for r in rows) == [4.0, 4.0, 7.5, 7.5]
    caches = sorted((out / "shared" / "generate-cache").iterdir())
    assert len(caches) == 2
    probes = json.loads((out / "sweep.json").read_text())["probes"]
    generated = {}
    for cache in caches:
        positives = cache / "generate" / "positives"
        table = read_image_table(positives)
        assert sorted(set(table["instance_id"].to_pylist())) == probes  # only the probes are generated for
        assert [read_manifest(positives / p)["rows"] for p in probes] == [2, 2]  # one generator call per image
        (value,) = set(table["cfg"].to_pylist())
        generated[value] = [read_manifest(positives / p)["created"] for p in probes]
    assert sorted(generated) == [4.0, 7.5]
    # Each trial read the cache of its own value.
    for row in rows:
        link = (out / "trials" / row["trial_id"] / "generate").resolve()
        assert set(read_image_table(link / "positives")["cfg"].to_pylist()) == {float(row["generate.guidance_scale"])}


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
    space = _space(tmp_path, "scheduler: fifo\nval_objects: 2\ntrain.loss: {grid: [infonce, hinge]}\n")
    try:
        sweep.run(cfg, space, stop=CtrlC(tmp_path / "interrupted"))
    except Exception as error:  # Tune reports the interruption; its state stays in OUT/sweep/tune
        print("interrupted:", error)
    assert (tmp_path / "interrupted").exists()
    tune_dir = Path(cfg.output_dir) / "sweep" / "tune"
    assert tune.Tuner.can_restore(str(tune_dir))
    # Running the same command again is a new driver with its own Ray (nothing of the interrupted one holds CPUs);
    # it restores OUT/sweep/tune and finishes every trial.
    ray_local.shutdown()
    ray_local.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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
    bad_cfg = _space(tmp_path, "generate.guidance_scale: {grid: [4.0, 0.5]}\n")
    with pytest.raises(ValueError, match=r"generate\.guidance_scale=0\.5 is not a valid config value"):
        sweep.run(cfg, bad_cfg)


def test_sweep_refuses_test_instances(toy, tmp_path):
    cfg = _cfg(toy, "x", data={"instances": ["mug_00", "mug_02"]})
    space = sweep.load_space(_space(tmp_path, "train.learning_rate: {grid: [1.0e-4]}\n"), cfg)
    with pytest.raises(ValueError, match=r"\['mug_02'\] are not val objects \(sweeps never tune on test objects\)"):
        sweep.choose_probes(cfg, space, {"mug_00": {"split": "val", "category": "mug"},
                                         "mug_01": {"split": "val", "category": "mug"},
                                         "mug_02": {"split": "test", "category": "mug"}})  # fmt: skip


def _negatives_trained_with(trial: Path, probe: str) -> set[str]:
    """The objects behind the negatives of ``probe``'s triplets, from the inputs train wrote for its run."""
    import pyarrow.parquet as pq

    inputs = trial / "inputs" / probe
    rows = pq.read_table(inputs / "rows.parquet", columns=["image_id", "instance_id"]).to_pydict()
    owner = dict(zip(rows["image_id"], rows["instance_id"], strict=True))
    return {owner[negative] for _, _, negative in json.loads((inputs / "triplets.json").read_text())}


@pytest.mark.slow
def test_trials_select_on_several_val_objects_never_training_on_distractors(mugs, tmp_path, ray_local):
    cfg = _cfg(mugs, "probes", train={"negatives": "val", "epochs": 2})
    space = _space(tmp_path, "scheduler: fifo\nval_objects: 2\ntrain.learning_rate: {grid: [1.0e-4]}\n")
    out = sweep.run(cfg, space)
    state = json.loads((out / "sweep.json").read_text())
    instances = json.loads((out / "shared" / "ingest" / "instances.json").read_text())
    probes, pool = state["probes"], state["pool"]
    assert len(probes) == 2 and len(pool) == 2 and not set(probes) & set(pool)
    assert {instances[i]["split"] for i in probes + pool} == {"val"}
    (row,) = _rows(out)
    trial = out / "trials" / row["trial_id"]
    record = json.loads((trial / "probes.json").read_text())
    for probe in probes:
        # (a) A probe trained only against pool mugs (never the other probe), and was scored among the probes only.
        negatives = _negatives_trained_with(trial, probe)
        assert negatives and negatives <= set(pool), (probe, negatives)
        assert record["distractors"][probe] == [p for p in probes if p != probe]
    # (b) The reported metric is the mean of the per-probe values the trial wrote, after every epoch.
    last = {p: record["val/pr_auc"][p][-1] for p in probes}
    assert {p: float(row[f"val/pr_auc/{p}"]) for p in probes} == pytest.approx(last)
    assert float(row["val/pr_auc"]) == pytest.approx(sum(last.values()) / 2)
    assert row["iterations"] == "2" and row["status"] == "completed"
    (progress,) = (out / "tune").glob(f"*{row['trial_id']}*/progress.csv")
    with progress.open() as handle:
        reports = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in reports] == [1, 2]
    for epoch, report in enumerate(reports):
        mean = sum(record["val/pr_auc"][p][epoch] for p in probes) / len(probes)
        assert float(report["val/pr_auc"]) == pytest.approx(mean)


def test_too_few_val_objects_stop_before_any_trial(tmp_path):
    from personalization.datasets import make_toy

    data = make_toy(tmp_path / "few", categories=("mug", "tote"), val_per_category=1, test_per_category=1,
                    test_per_split=1, dense_per_instance=0, size=32)  # fmt: skip
    cfg = build_config({"output_dir": str(tmp_path / "out"), "data": {"root": str(data)},
                        "train": {"negatives": "val"}})  # fmt: skip
    space = _space(tmp_path, "train.learning_rate: {grid: [1.0e-4]}\n")
    with pytest.raises(UserError, match=r"2 val objects \(mug: 1, tote: 1\) allow only 0 probes.*Fix: add val"):
        sweep.run(cfg, space)
    assert not (tmp_path / "out").exists()  # no stage, no Ray, no trial
