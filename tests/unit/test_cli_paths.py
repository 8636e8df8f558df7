import os

from personalization.config import load_config
from pipelines.common import absolute_paths


def test_relative_local_paths_become_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "data").mkdir()
    cfg = absolute_paths(load_config(None, ["output_dir=out", "data.root=data", "model.weights=weights"]))
    assert cfg.output_dir == str(tmp_path / "out")  # made absolute even before it exists
    assert cfg.data.root == str(tmp_path / "data") and cfg.model.weights == str(tmp_path / "weights")
    hub = absolute_paths(load_config(None, ["model.weights=facebook/dinov2-base"]))
    assert hub.model.weights == "facebook/dinov2-base" and os.path.isabs(hub.output_dir)
