"""Safe loading, checked over the source tree: nothing we load can run code, and every image table is validated.

A new occurrence of a risky pattern fails here until it is made safe or added to an allow-list with its reason.
"""

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("personalization", "pipelines", "benchmarks")


def _sources() -> dict[str, str]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 20, "the source tree was not found"
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def _calls(text: str, name: str) -> list[str]:
    """The full text of every ``name(...)`` call in ``text`` (parentheses balanced)."""
    calls = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(name)}\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        calls.append(text[match.start() : end + 1])
    return calls


def test_every_torch_load_is_weights_only():
    found = 0
    for path, text in _sources().items():
        for call in _calls(text, "torch.load"):
            found += 1
            assert re.search(r"weights_only\s*=\s*True", call), f"{path}: {call} must pass weights_only=True"
    assert found >= 1  # the scan sees the known ones (MobileNetV2 weights, train checkpoints)


def test_no_remote_code_and_no_unpickling():
    risky = {
        r"trust_remote_code\s*=\s*True": "runs code from the model repository",
        r"^\s*(import pickle|from pickle import|import dill|import joblib)": "unpickling runs code",
        r"(?<![\w.])(pickle|cloudpickle|dill|joblib)\.loads?\(": "unpickling runs code",
        r"allow_pickle\s*=\s*True": "np.load with pickles runs code",
        r"yaml\.(unsafe_)?load\(": "use yaml.safe_load",
        r"(?<![\w.])(eval|exec)\(": "evaluates text as code",
        r"safe_serialization\s*=\s*False": "adapters and checkpoints are saved as safetensors",
    }
    problems = [
        f"{path}:{n}: {line.strip()} ({why})"
        for path, text in _sources().items()
        for n, line in enumerate(text.splitlines(), 1)
        for pattern, why in risky.items()
        if re.search(pattern, line) and not line.lstrip().startswith("#")
    ]
    assert problems == []


# Places that write torch pickles (read back only with weights_only=True), with the reason they are not safetensors.
TORCH_SAVE_ALLOWED = {
    "personalization/contrastive/fit.py": "train resume state (trainable LoRA tensors), never shipped",
    "personalization/contrastive/step.py": "train resume state (optimizer state), never shipped",
    "pipelines/dreambooth.py": "DreamBooth resume checkpoint (trainable weights + optimizer), never shipped",
    "personalization/zoo/dreamsim.py": "dreamsim's own cache format (.pth.tar) for the tiny offline test model",
}
# Places that read Parquet without `schema.read_image_table`, with the reason.
PARQUET_READ_ALLOWED = {
    "personalization/schema.py": "read_image_table itself: validate_table on every shard",
    "pipelines/training.py": "the run's own rows.parquet, written from a validated table a moment before",
    "pipelines/filter.py": "shards validated by read_image_table in the same run() before Ray reads them",
    "personalization/gallery.py": "find's own embedding cache; EmbeddingCache._open checks the schema of each shard",
}


@pytest.mark.parametrize(
    "pattern, allowed",
    [
        (r"torch\.save\(", TORCH_SAVE_ALLOWED),
        (
            r"pq\.read_table\(|pq\.ParquetFile\(|read_parquet\(|pd\.read_parquet\(|pads\.dataset\(\s*[\"'/]",
            PARQUET_READ_ALLOWED,
        ),
    ],
    ids=["torch.save", "parquet-read"],
)
def test_risky_io_only_where_allowed(pattern, allowed):
    used = {path for path, text in _sources().items() if re.search(pattern, text)}
    assert used <= set(allowed), f"new uses need a safe form or an allow-list reason: {sorted(used - set(allowed))}"


def test_saved_adapters_are_safetensors(tmp_path, zoo):
    """The production save path (LoRA DINOv2 from the zoo) writes safetensors only, and loads back."""
    from personalization.config import ModelConfig
    from personalization.models import apply_lora, build_encoder, load_adapter, save_adapter

    model_cfg = ModelConfig(backbone="dinov2_vitb14", weights=str(zoo["dinov2"]), image_size=28)
    save_adapter(apply_lora(build_encoder(model_cfg), model_cfg), tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    load_adapter(build_encoder(model_cfg), tmp_path / "adapter")


def test_dataset_folder_linked_from_outside_is_rejected(toy, tmp_path, capsys):
    """A whole instance folder that is a symlink out of the dataset root is refused, not followed."""
    from pipelines import cli

    root = tmp_path / "toy"
    shutil.copytree(toy, root)
    outside = tmp_path / "outside" / "mug_00"
    shutil.move(root / "train" / "mug_00", outside)
    (root / "train" / "mug_00").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ingest", f"data.root={root}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "outside the dataset root" in err and "Traceback" not in err


def test_image_table_with_another_schema_version_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from personalization.schema import IMAGE_SCHEMA, SchemaError, iter_image_batches, read_image_table

    def streamed():
        return list(iter_image_batches(tmp_path, columns=["image_id"]))

    key = next(iter(IMAGE_SCHEMA.metadata))  # the schema-version key
    table = IMAGE_SCHEMA.empty_table().replace_schema_metadata({key: b"99"})
    pq.write_table(table, tmp_path / "old.parquet")
    for read in (lambda: read_image_table(tmp_path), streamed):
        with pytest.raises(SchemaError, match=r"old\.parquet.*version 99"):
            read()
    pq.write_table(pa.table({"image_id": ["a"]}), tmp_path / "old.parquet")
    for read in (lambda: read_image_table(tmp_path), streamed):
        with pytest.raises(SchemaError, match=r"old\.parquet.*lacks columns"):
            read()
