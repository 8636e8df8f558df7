import json

import pytest

from personalization.artifacts import (
    MANIFEST,
    RESOLVED_CONFIG,
    commit_stage,
    hash_config,
    input_hash,
    is_current,
    read_manifest,
)


def _writer(rows, calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "data.txt").write_text("x" * rows)
        return rows

    return build


def test_commit_writes_atomically_with_manifest_last(tmp_path):
    calls = []
    out = commit_stage(tmp_path / "stage", "ingest", {"a": 1}, _writer(3, calls), resolved_config={"name": "n"})
    manifest = read_manifest(out)
    assert manifest["stage"] == "ingest" and manifest["rows"] == 3 and manifest["schema_version"] == 1
    assert manifest["config_hash"] == hash_config({"a": 1})
    assert (out / "data.txt").read_text() == "xxx"
    assert "name: n" in (out / RESOLVED_CONFIG).read_text()
    assert not list(tmp_path.glob(".stage.tmp-*"))  # the temporary folder was renamed into place
    assert calls[0] != out  # it was built elsewhere


def test_same_hash_skips_and_new_config_rebuilds(tmp_path):
    calls = []
    out = commit_stage(tmp_path / "s", "train", {"lr": 1}, _writer(1, calls))
    before = (out / MANIFEST).read_text()
    commit_stage(tmp_path / "s", "train", {"lr": 1}, _writer(1, calls))
    assert len(calls) == 1 and (out / MANIFEST).read_text() == before
    assert is_current(out, "train", {"lr": 1}) and not is_current(out, "train", {"lr": 2})
    commit_stage(tmp_path / "s", "train", {"lr": 2}, _writer(2, calls))
    assert len(calls) == 2 and read_manifest(out)["rows"] == 2 and (out / "data.txt").read_text() == "xx"


def test_input_change_invalidates_downstream(tmp_path):
    calls = []
    upstream = commit_stage(tmp_path / "up", "ingest", {"v": 1}, _writer(1, calls))
    commit_stage(tmp_path / "down", "train", {}, _writer(1, calls), inputs={"ingest": upstream})
    commit_stage(tmp_path / "down", "train", {}, _writer(1, calls), inputs={"ingest": upstream})
    assert len(calls) == 2  # up, down; the second down is skipped
    commit_stage(tmp_path / "up", "ingest", {"v": 2}, _writer(1, calls))
    commit_stage(tmp_path / "down", "train", {}, _writer(1, calls), inputs={"ingest": upstream})
    assert len(calls) == 4
    assert read_manifest(tmp_path / "down")["inputs"]["ingest"] == read_manifest(upstream)["hash"]


def test_crash_leaves_nothing_and_folder_without_manifest_is_redone(tmp_path):
    def crash(tmp):
        (tmp / "partial.parquet").write_text("half")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        commit_stage(tmp_path / "s", "generate", {}, crash)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))

    # a hard kill leaves both a temp folder and (from an older layout) an unmanifested final folder
    (tmp_path / ".s.tmp-dead").mkdir()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "stale.parquet").write_text("stale")
    calls = []
    out = commit_stage(tmp_path / "s", "generate", {}, _writer(2, calls))
    assert calls and not (out / "stale.parquet").exists() and not (tmp_path / ".s.tmp-dead").exists()
    assert read_manifest(out)["rows"] == 2


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage that makes it first"):
        commit_stage(tmp_path / "s", "train", {}, _writer(1, []), inputs={"ingest": tmp_path / "nope"})


def test_plain_file_inputs_hash_by_content(tmp_path):
    source = tmp_path / "prompts.json"
    source.write_text(json.dumps({"a": ["x"]}))
    calls = []
    commit_stage(tmp_path / "s", "generate", {}, _writer(1, calls), inputs={"prompts": source})
    commit_stage(tmp_path / "s", "generate", {}, _writer(1, calls), inputs={"prompts": source})
    source.write_text(json.dumps({"a": ["y"]}))
    commit_stage(tmp_path / "s", "generate", {}, _writer(1, calls), inputs={"prompts": source})
    assert len(calls) == 2


def test_folder_of_committed_stages_is_hashed_from_manifests_only(tmp_path):
    """OUT/generate (positives/ + negatives/<category>/): each committed part counts by its manifest hash, so no
    data file is read back; a loose folder (a user's negatives) counts by content."""
    generate = tmp_path / "generate"
    for part in ("positives", "negatives/mug"):
        commit_stage(generate / part, "generate", {"part": part}, lambda tmp: (tmp / "x.parquet").write_bytes(b"1"))
    before = input_hash(generate)
    (generate / "positives" / "x.parquet").write_bytes(b"changed in place, manifest untouched")
    assert input_hash(generate) == before
    commit_stage(generate / "negatives" / "cup", "generate", {"part": "cup"}, lambda tmp: None)
    assert input_hash(generate) != before
    loose = tmp_path / "my_negatives"
    loose.mkdir()
    (loose / "a.jpg").write_bytes(b"a")
    first = input_hash(loose)
    (loose / "a.jpg").write_bytes(b"b")
    assert input_hash(loose) != first
