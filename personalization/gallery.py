"""Searching a folder of photos for the object: listing, embedding by content hash, a Parquet embedding cache, ranking.

Plain Python (no Ray): ``pipelines/find.py`` runs :func:`embed_items` inside Ray Data actors and the rest on the
driver. A photo is known by the sha256 of its bytes, so a renamed or copied photo is not embedded again and an
edited one is. The cache holds one folder per encoder identity
(:func:`personalization.personal_encoder.encoder_identity`), each of Parquet shards ``sha256, embedding``
(float32 bytes) written whole (temporary file, then ``os.replace``), so a crash loses at most the shard in flight.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from personalization.datasets.images import is_image_file, unread_image_problem

CACHE_SCHEMA = pa.schema([("sha256", pa.string()), ("embedding", pa.binary())])
SHARD_ROWS = 4096  # embeddings per cache shard: a crash loses at most this many


def list_gallery(root: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every photo under ``root`` (recursively, sorted; hidden files and folders left out), and the other files
    as (path, reason) to report as skipped."""
    root = Path(root)
    photos, skipped = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith("."):
                continue
            if is_image_file(path):
                photos.append(path)
            else:
                skipped.append((str(path), unread_image_problem(path) or f"{path}: not a photo file (by its name)"))
    return photos, skipped


def embed_items(encoders: Mapping, known: Mapping[str, set], paths: Sequence[str], pngs: Sequence[bytes]) -> dict:
    """Hash and embed one batch of photos with every encoder in ``encoders`` ({name: PersonalEncoder}).

    Item k is the file ``paths[k]``, or (when that is empty) the image bytes ``pngs[k]``. An encoder embeds only
    the photos whose hash is not in ``known[name]``. Returns columns ``path, sha256, error`` and, per encoder name,
    the float32 embedding bytes (``b""`` where known or unreadable). A file that cannot be read or decoded gets
    its reason in ``error`` and no hash; nothing raises for a bad photo.
    """
    from personalization.datasets.images import load_image
    from personalization.errors import UserError
    from personalization.schema import decode_image

    out = {"path": list(paths), "sha256": [], "error": [], **{name: [b""] * len(paths) for name in encoders}}
    images = {}
    for k, (path, png) in enumerate(zip(paths, pngs, strict=True)):
        try:
            data = Path(path).read_bytes() if path else png
            sha = hashlib.sha256(data).hexdigest()
            if any(sha not in known.get(name, ()) for name in encoders):
                images[k] = load_image(Path(path))[0] if path else decode_image(data)
        except (UserError, OSError) as error:
            out["sha256"].append("")
            out["error"].append(str(error) or type(error).__name__)
            continue
        out["sha256"].append(sha)
        out["error"].append("")
    shared: dict = {}  # transform key -> pixels of every decoded image: one preprocessing for both encoders
    rows = {k: row for row, k in enumerate(images)}
    for name, encoder in encoders.items():
        todo = [k for k in images if out["sha256"][k] not in known.get(name, ())]
        if not todo:
            continue
        if hasattr(encoder, "preprocess"):
            if encoder.transform_key not in shared:
                shared[encoder.transform_key] = encoder.preprocess(list(images.values()))
            vectors = encoder.embed(shared[encoder.transform_key][[rows[k] for k in todo]])
        else:
            vectors = encoder.embed([images[k] for k in todo])
        for k, vector in zip(todo, vectors, strict=True):
            out[name][k] = np.ascontiguousarray(vector, np.float32).tobytes()
    return out


class EmbeddingCache:
    """Embeddings of one encoder under ``root/<identity>/``, keyed by content hash. See the module doc."""

    def __init__(self, root: str | Path, identity: str):
        self.folder = Path(root) / identity[:32]
        self._pending: list[tuple[str, bytes]] = []

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []

    @staticmethod
    def _open(shard: Path) -> pq.ParquetFile:
        """A cache shard, after checking it is one (a stray or damaged file gets an error naming it)."""
        from personalization.errors import UserError

        try:
            parquet = pq.ParquetFile(shard)
        except (OSError, pa.ArrowException) as error:
            raise UserError(
                f"{shard}: unreadable embedding cache shard ({error}); delete it and find re-embeds"
            ) from None
        if not parquet.schema_arrow.equals(CACHE_SCHEMA):
            raise UserError(
                f"{shard}: not an embedding cache shard (columns {parquet.schema_arrow.names}); delete it and "
                "find re-embeds those photos"
            )
        return parquet

    def known(self) -> set[str]:
        """The hashes already embedded (reads only the hash column)."""
        return {sha for shard in self.shards() for sha in self._open(shard).read(columns=["sha256"])[0].to_pylist()}

    def add(self, sha: str, embedding: bytes) -> None:
        self._pending.append((sha, embedding))
        if len(self._pending) >= SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the pending embeddings as one new shard (temporary file, then rename)."""
        if not self._pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        shas, vectors = zip(*self._pending, strict=True)
        table = pa.table({"sha256": list(shas), "embedding": list(vectors)}, schema=CACHE_SCHEMA)
        final = self.folder / f"part-{uuid.uuid4().hex}.parquet"
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".part-", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._pending = []

    def iter_embeddings(self, wanted: set[str], batch_rows: int = 8192) -> Iterable[tuple[list[str], np.ndarray]]:
        """(hashes, (n, D) float32) of the cached embeddings whose hash is in ``wanted``, a batch at a time."""
        value_set = pa.array(sorted(wanted), pa.string())
        for shard in self.shards():
            for batch in self._open(shard).iter_batches(batch_size=batch_rows):
                batch = batch.filter(pc.is_in(batch["sha256"], value_set=value_set))
                if batch.num_rows:
                    blobs = batch["embedding"].to_pylist()
                    yield batch["sha256"].to_pylist(), np.stack([np.frombuffer(b, np.float32) for b in blobs])

    def vectors(self, shas: Sequence[str]) -> np.ndarray:
        """(len(shas), D) embeddings in the order of ``shas``; a missing hash is an error."""
        found = {sha: row for ids, rows in self.iter_embeddings(set(shas)) for sha, row in zip(ids, rows, strict=True)}
        missing = [sha for sha in shas if sha not in found]
        if missing:
            raise KeyError(f"{self.folder}: no embedding for {len(missing)} hash(es), e.g. {missing[0]}")
        return np.stack([found[sha] for sha in shas])

    def score(self, shas: set[str], references: np.ndarray) -> dict[str, float]:
        """{hash: max cosine to ``references``} for every cached hash in ``shas``, streamed shard by shard."""
        from personalization.personal_encoder import compute_scores

        scores: dict[str, float] = {}
        for ids, rows in self.iter_embeddings(shas):
            scores.update(zip(ids, compute_scores(rows, references).tolist(), strict=True))
        return scores


def rank_rows(photos: Sequence[tuple[str, str]], scores: Mapping[str, float], pretrained: Mapping[str, float]):
    """Rows ``path, score, pretrained_score, rank, pretrained_rank, sha256`` for ``photos`` ((path, sha)), sorted
    by ``score`` descending (ties by path); rank 1 is the most likely photo of the object under each encoder."""
    rows = [
        {"path": path, "score": scores[sha], "pretrained_score": pretrained[sha], "sha256": sha} for path, sha in photos
    ]
    for key, rank_key in (("pretrained_score", "pretrained_rank"), ("score", "rank")):
        rows.sort(key=lambda row: (-row[key], row["path"]))
        for rank, row in enumerate(rows, 1):
            row[rank_key] = rank
    return rows


RESULT_COLUMNS = ("rank", "path", "score", "pretrained_score", "pretrained_rank", "sha256")


def format_csv(rows: Iterable[Mapping], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()
