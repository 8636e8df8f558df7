"""A validation probe: classification PR-AUC of one val instance under the encoder being trained.

Used by sweeps to select settings on validation instances only (never the instances being evaluated). It runs
inside a sweep trial's training workers (pipelines/sweep_trial.py) and is built from paths only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from personalization.config import build_config
from personalization.evaluation.images import load_instances_file


class ValidationProbe:
    """``probe(model) -> {"val/pr_auc": AP}`` for the model being trained (no Ray; built from paths only).

    Gallery: the real_train photos of the val instances; queries: their real_test photos (``test_dense`` only
    when nothing else exists). AP = ``average_precision_score(query is V, max_j <q, g_j> over V's gallery)``.
    ``instances``: the objects whose photos are scored (V and its distractors; default every val instance);
    after the first call ``scored_instances`` lists the objects whose queries were scored.
    """

    def __init__(
        self, images_path: str, instance_id: str, model: dict, batch_size: int = 32, instances: Sequence[str] = ()
    ):
        self.images_path, self.instance_id, self.model, self.batch_size = images_path, instance_id, model, batch_size
        self.instances = tuple(instances)
        self.scored_instances: list[str] = []
        self._data = None

    def _load(self):
        from personalization.models import build_transform
        from personalization.schema import decode_image, read_image_table

        instances = load_instances_file(Path(self.images_path).parent)
        val = list(self.instances) or sorted(i for i, info in instances.items() if info["split"] == "val")
        columns = ["instance_id", "role", "split", "image"]
        table = read_image_table(self.images_path, columns=columns, instance_id=val).to_pylist()
        gallery = [r for r in table if r["role"] == "real_train"]
        tests = [r for r in table if r["role"] == "real_test"]
        queries = [r for r in tests if r["split"] != "test_dense"] or tests
        model_cfg = build_config({"model": self.model}).model
        transform = build_transform(model_cfg, train=False)
        pixels = {
            name: torch.stack([transform(decode_image(r["image"])) for r in rows])
            for name, rows in (("gallery", gallery), ("queries", queries))
        }
        labels = {"gallery": [r["instance_id"] for r in gallery], "queries": [r["instance_id"] for r in queries]}
        self.scored_instances = sorted(set(labels["queries"]))
        self._data = (pixels, labels, model_cfg.eval_feature)

    @torch.no_grad()
    def _embed(self, model: torch.nn.Module, pixels: torch.Tensor, kind: str):
        device = next(model.parameters()).device
        chunks = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start : start + self.batch_size].to(device)
            chunks.append((model.embed(batch, kind=kind) if hasattr(model, "embed") else model(batch)).float().cpu())
        return torch.cat(chunks).numpy()

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from personalization.evaluation.classification import evaluate_classification

        if self._data is None:
            self._load()
        pixels, labels, kind = self._data
        was_training = model.training
        model.eval()  # no LoRA dropout while measuring
        try:
            gallery, queries = (self._embed(model, pixels[k], kind) for k in ("gallery", "queries"))
        finally:
            model.train(was_training)
        result = evaluate_classification(gallery, labels["gallery"], queries, labels["queries"], self.instance_id)
        return {"val/pr_auc": result["pr_auc"]}
