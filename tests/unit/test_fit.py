"""`fit` on one process (no Ray): the real MobileNetV2 with LoRA learns a small fixed set, and a run resumed
from a checkpoint its hooks wrote ends with the losses and weights of an uninterrupted run."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from personalization.config import build_config
from personalization.contrastive.data import TripletDataset
from personalization.contrastive.fit import build_lora_encoder, fit, weights_hash
from personalization.schema import make_image_id, make_row, write_image_table


def _cfg(**train):
    settings = {"num_triplets": 8, "batch_size": 4, "epochs": 2, "learning_rate": 3e-3, "checkpoint_every": 1}
    return build_config({"model": {"backbone": "mobilenetv2", "image_size": 32}, "train": settings | train})


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Two objects, 4 photos each on noise: a red square and a blue disc."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    shapes = {"red": (abs(yy - 24) < 12) & (abs(xx - 24) < 12), "blue": (yy - 24) ** 2 + (xx - 24) ** 2 < 150}
    rows = []
    for name, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        for k in range(4):
            pixels = rng.integers(0, 80, (48, 48, 3)).astype(np.uint8)
            pixels[shapes[name]] = color
            rows.append(make_row(image_id=make_image_id(name, k), instance_id=name, category="thing", role="real_train",
                                 source="real", image=Image.fromarray(pixels)))  # fmt: skip
    path = tmp_path_factory.mktemp("fit") / "images.parquet"
    write_image_table(rows, path)
    return pq.read_table(path)


def _triplets():
    red, blue = [make_image_id("red", k) for k in range(4)], [make_image_id("blue", k) for k in range(4)]
    return [(red[k], red[(k + 1) % 4], blue[k]) for k in range(4)] + [
        (blue[k], blue[(k + 1) % 4], red[(k + 2) % 4]) for k in range(4)
    ]


def _start(cfg, table):
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation in every run
    trainable = build_lora_encoder(cfg)
    return trainable, TripletDataset(table, _triplets(), trainable.transform, max_side=2 * cfg.model.image_size)


def _fit(cfg, table, **hooks):
    trainable, dataset = _start(cfg, table)
    state = fit(trainable.model, dataset, cfg.train, seed=cfg.seed, save_model=trainable.save, **hooks)
    return state, trainable.model


def test_fit_lowers_the_loss_on_a_fixed_set(table):
    state, _ = _fit(_cfg(epochs=6, checkpoint_every=0), table)
    assert state.step == 6 * 2 and len(state.loss) == 12 and state.start_step == 0
    first, last = np.mean(state.loss[:2]), np.mean(state.loss[-2:])
    assert last < 0.6 * first, state.loss


def test_a_resumed_run_ends_as_an_uninterrupted_one(table, tmp_path):
    written, steps = {}, []

    def keep(report):
        folder = tmp_path / f"step-{report.metrics['step']}{'-final' if report.final else ''}"
        folder.mkdir()
        report.write(folder)
        written[folder.name] = folder

    cfg = _cfg()
    whole, model = _fit(cfg, table, on_checkpoint=keep, on_step=lambda m: steps.append((m["step"], m["epoch"])))
    assert steps == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert sorted(written) == ["step-1", "step-2", "step-3", "step-4-final"]  # every step but the last, then final
    final = written["step-4-final"]
    saved = json.loads((final / "state.json").read_text())
    assert saved["loss"] == whole.loss and saved["steps"] == 4 and saved["replica_hashes"] == [weights_hash(model)]
    assert (final / "adapter" / "adapter_model.safetensors").is_file() and (final / "optimizer.pt").is_file()
    assert not (written["step-1"] / "adapter").exists()

    # Resume mid-epoch (after step 1 of 2) and at an epoch boundary: the same losses, the same weights.
    for name in ("step-1", "step-2"):
        resumed, resumed_model = _fit(cfg, table, resume=written[name])
        done = int(name.split("-")[1])
        assert resumed.start_step == done and resumed.loss == whole.loss
        assert weights_hash(resumed_model) == weights_hash(model)
