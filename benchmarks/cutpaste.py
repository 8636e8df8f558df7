"""`cutpaste` throughput: the Ray Data stage (``pipelines.cutpaste.run``) against ``make_composites`` in a loop.

Workload: the toy benchmark after the real ``ingest`` stage (one category: ``instances`` test instances + one val
instance, all composited), procedural backgrounds, ``composites`` per instance at ``size`` px. Candidate: the
whole stage (read, Ray Data tasks, Parquet write, commit). Baseline: the same real rows and backgrounds,
``make_composites`` in one process, the rows written with ``write_image_table``. Both end to end, Ray started
before timing; composites/s = composites written / wall seconds. The stage's tasks may run on every core (PIL
work is single-threaded), which is the point of the stage.
"""

from __future__ import annotations

import shutil

from benchmarks.common import Result, local_ray, ratio, timed, toy_workspace


def plain_loop(cfg, out) -> int:
    from personalization import schema
    from personalization.synthesis.cutpaste import composite_options, make_composites
    from pipelines.common import load_instances, stage_dir
    from pipelines.cutpaste import _encoded_backgrounds, _load_real_rows, select_instances

    instances = load_instances(cfg)
    real = _load_real_rows(stage_dir(cfg, "ingest", "images.parquet"), select_instances(cfg, instances))
    blobs, key = _encoded_backgrounds(cfg)
    backgrounds = [schema.decode_image(b) for b in blobs]
    rows = make_composites(
        real.to_pylist(), backgrounds, n=cfg.cutpaste.images_per_instance, seed=cfg.seed, backgrounds_key=key,
        **composite_options(cfg.cutpaste),
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    return schema.write_image_table(rows, out / "composites.parquet")


def measure(instances: int = 2, composites: int = 100, size: int = 256) -> Result:
    from personalization.config import build_config
    from personalization.schema import read_image_table
    from pipelines import cutpaste
    from pipelines.common import stage_dir

    result = Result("cutpaste", "ray stage / plain loop, composites/s", 0.0)
    with local_ray():
        run_dir, layer = toy_workspace("cutpaste", instances=instances, composites=1, size=size)
        cfg = build_config(layer, {"cutpaste": {"images_per_instance": composites, "image_size": size}})
        n, plain_s = timed(lambda: plain_loop(cfg, run_dir / "plain"))
        shutil.rmtree(stage_dir(cfg, "cutpaste"), ignore_errors=True)
        _, ray_s = timed(lambda: cutpaste.run(cfg))
        made = read_image_table(stage_dir(cfg, "cutpaste"), columns=["image_id"]).num_rows
    assert made == n, (made, n)
    result.add("plain loop (make_composites)", n / plain_s, "composites/s")
    result.add("ray stage (cutpaste.run)", made / ray_s, "composites/s")
    result.add("composites", n, "")
    result.notes.append(
        f"{instances} test + 1 val instances x {composites} composites, {size} px, procedural backgrounds"
    )
    result.ratio = ratio(made / ray_s, n / plain_s)
    return result
